-- The original Kafka-engine path, fixed for a current ClickHouse: each Kafka message
-- is one raw Command, so the format is ProtobufSingle (Protobuf expects
-- length-delimited messages); args become JSON with toJSONString. This path records
-- whatever is on the topic, forged or not: control_decisions says what was verified.
-- Placeholders substituted on apply: {kafka_brokers}, and {format_schemas}, the
-- ABSOLUTE directory holding control.proto (the Kafka engine's background consumer
-- does not resolve a relative format_schema against format_schema_path).
CREATE TABLE IF NOT EXISTS kafka_control_cmd
(
    ts             UInt64,
    module         Enum8('ARBITRAGE' = 0, 'MEV' = 1),
    action         Enum8('START' = 0, 'STOP' = 1, 'RESTART' = 2, 'THROTTLE' = 3, 'POLICY' = 4, 'KILL' = 5),
    args           Map(String, String),
    request_id     String,
    issuer         String,
    schema_version String,
    sig            String,
    pubkey_id      String,
    sig_alg        String,
    nonce          UInt64
)
ENGINE = Kafka
SETTINGS kafka_broker_list = '{kafka_brokers}',
         kafka_topic_list = 'control-commands-proto',
         kafka_group_name = 'ch-ctrl',
         kafka_format = 'ProtobufSingle',
         format_schema = '{format_schemas}/control.proto:Command',
         kafka_num_consumers = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_control_cmd TO control_ledger AS
SELECT
    now()                  AS dt,
    toDateTime(ts)         AS ts,
    toString(module)       AS module,
    toString(action)       AS action,
    request_id,
    issuer,
    toJSONString(args)     AS args_json,
    pubkey_id,
    sig_alg,
    nonce,
    sig,
    ''                     AS raw
FROM kafka_control_cmd;
