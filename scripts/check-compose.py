#!/usr/bin/env python3
"""Checks docker-compose.yml and Dockerfile as far as a machine without a Docker
engine can: structure, pinned images, build targets that exist, bind-mount sources
that exist (after scripts/compose-init.sh), dependencies that are services with
health checks, environment names the sidecar really reads, no secret in any
service's environment (secrets are mounted files named by *_FILE variables, each
mounted), and the sidecar's TPU leader at the development TPU's fixed address on
the compose network.

  check-compose.py [--run-dir DIR]   DIR replaces ./.run/compose (default: as written)
"""
import argparse
import glob
import ipaddress
import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(msg):
    sys.exit(f"check-compose: {msg}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default=None)
    a = ap.parse_args()
    run_dir = a.run_dir or os.path.join(ROOT, ".run/compose")

    def local(path):
        if path.startswith("./.run/compose"):
            return os.path.join(run_dir, path[len("./.run/compose"):].lstrip("/"))
        return os.path.join(ROOT, path)

    compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
    dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, re.M | re.I))
    for m in re.finditer(r"^COPY\s+(?!--from)(.+)$", dockerfile, re.M):
        for src in m.group(1).split()[:-1]:
            if not os.path.exists(os.path.join(ROOT, src)):
                fail(f"Dockerfile copies {src}, which does not exist")
    for img in re.findall(r"^FROM\s+(\S+)", dockerfile, re.M):
        if img not in stages and (":" not in img or img.endswith(":latest")):
            fail(f"Dockerfile base image {img} is not pinned")

    sidecar_env = set()
    for src in glob.glob(os.path.join(ROOT, "sidecar/src/**/*.rs"), recursive=True):
        text = open(src).read()
        sidecar_env |= set(re.findall(r'(?:env\(|secret_key\(env,\s*)"([A-Z0-9_]+)"', text))
        # The secrets a variable or a file gives (config.rs, SECRET_FILES).
        for pair in re.findall(r'\("([A-Z0-9_]+)",\s*"([A-Z0-9_]+_FILE)"\)', text):
            sidecar_env |= set(pair)
    # Secrets reach a container as files only it reads (compose-init.sh), never in
    # its environment, which `docker inspect` shows to anyone the engine answers.
    # By their names' shape: a secret added later is caught too.
    secret_name = re.compile(r"(_SK_HEX|_KEY_HEX|_KEY_PREV_HEX|_IDENTITY_HEX|PASSWORD|_AUTH|_SECRET)$")

    services = compose.get("services") or fail("no services")
    want = {"envoy", "sidecar", "kafka", "clickhouse"}
    if not want <= set(services):
        fail(f"missing services: {sorted(want - set(services))}")
    for name, svc in services.items():
        if not isinstance(svc, dict):
            fail(f"{name}: not a mapping")
        if "image" in svc:
            img = svc["image"]
            if ":" not in img or img.endswith(":latest"):
                fail(f"{name}: image {img} is not pinned to a version")
        elif "build" in svc:
            target = svc["build"].get("target")
            if target not in stages:
                fail(f"{name}: build target {target!r} is not a Dockerfile stage {sorted(stages)}")
        else:
            fail(f"{name}: neither image nor build")
        for port in svc.get("ports", []):
            # Published on an address the operator chose (loopback unless told),
            # never on every interface by default.
            if not str(port).startswith("${GW_PUBLISH_ADDRESS:-127.0.0.1}:"):
                fail(f"{name}: port {port} is published on every interface; "
                     "publish it on ${GW_PUBLISH_ADDRESS:-127.0.0.1}")
        # A service built from the sidecar's stage runs gw-sidecar as its entrypoint:
        # its command is gw-sidecar's arguments (naming the program again made it
        # refuse its arguments).
        command = svc.get("command") or []
        if svc.get("build", {}).get("target") == "sidecar" and command[:1] == ["gw-sidecar"]:
            fail(f"{name}: command {command} repeats the entrypoint gw-sidecar; give its arguments only")
        for vol in svc.get("volumes", []):
            src = vol.get("source", "") if isinstance(vol, dict) else vol.split(":")[0]
            # Private keys are mounted one by one into the service that uses them,
            # never a whole directory of them.
            if src.startswith("./") and os.path.isdir(local(src)) and glob.glob(os.path.join(local(src), "*.key")):
                fail(f"{name}: mounts the directory {src}, which holds private keys; mount its own files only")
            if src.startswith("./") and not os.path.exists(local(src)):
                fail(f"{name}: bind mount source {src} does not exist (run scripts/compose-init.sh)")
            elif not src.startswith(("./", "/")) and src not in (compose.get("volumes") or {}):
                fail(f"{name}: named volume {src} is not declared")
        # A container's command line is readable by every user of the host (ps).
        argv = json.dumps([svc.get(k) for k in ("command", "entrypoint", "healthcheck")])
        if re.search(r"--password\b|\s-p\s*\$", argv):
            fail(f"{name}: a password on a command line (every user of the host reads it "
                 "with ps); read it from the mounted file into a client configuration file")
        if svc.get("env_file"):
            fail(f"{name}: env_file: give secrets as files (the *_FILE variables), "
                 "and the rest in environment, where this check reads them")
        environment = svc.get("environment") or {}
        if isinstance(environment, list):
            fail(f"{name}: environment as a list; give it as a mapping")
        leaked = sorted(k for k in environment if secret_name.search(k))
        if leaked:
            fail(f"{name}: secrets in the environment: {leaked}; use their *_FILE variables")
        targets = set()
        for v in svc.get("volumes", []):
            if isinstance(v, dict):
                targets.add(v.get("target"))
            elif ":" in v:
                targets.add(v.split(":")[1])
        for var, path in environment.items():
            if var.endswith("_FILE") and path not in targets:
                fail(f"{name}: {var} names {path}, which no volume mounts")
        if name == "sidecar":
            unknown = set(svc.get("environment", {})) - sidecar_env
            if unknown:
                fail(f"sidecar: environment names the sidecar does not read: {sorted(unknown)}")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                fail(f"{name}: depends on unknown service {dep}")
            if cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                fail(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
    # The sidecar's configuration sends to the development TPU at its fixed address.
    sidecar_cfg = json.load(open(local("./.run/compose/sidecar.json")))
    leaders = sidecar_cfg["sender"]["leaders"]["static"]
    tpu_ip = services["tpu-sink"]["networks"]["default"]["ipv4_address"]
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    if ipaddress.ip_address(tpu_ip) not in ipaddress.ip_network(subnet):
        fail(f"tpu-sink's address {tpu_ip} is outside the network's {subnet}")
    if [l["tpu_quic"].rsplit(":", 1)[0] for l in leaders] != [tpu_ip]:
        fail(f"the sidecar's TPU leaders {leaders} are not the development TPU at {tpu_ip}")
    print(f"compose: ok ({len(services)} services, Dockerfile stages {sorted(stages)})")


if __name__ == "__main__":
    main()
