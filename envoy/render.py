#!/usr/bin/env python3
"""Renders envoy/envoy.yaml.tmpl into a runnable Envoy config.

  render.py --filter-config FILE.json [--upstream-plaintext] [--set NAME=VALUE ...] -o OUT.yaml

Envoy speaks to the sidecar over mutual TLS (its client certificate is the edge
identity the sidecar trusts); --upstream-plaintext is for an upstream that does not
speak TLS (a development sidecar with insecure_plaintext, a test echo server).

Values come from envoy/defaults.env, then the environment, then --set. A multi-line
value is indented to its placeholder's column. Unknown or missing names are errors.
Relative file paths are made absolute (Envoy resolves them against its own cwd).
"""
import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")
PATH_VARS = {"GW_TLS_CERT", "GW_TLS_KEY", "GW_FILTER_WASM", "GW_UPSTREAM_CLIENT_CERT",
             "GW_UPSTREAM_CLIENT_KEY", "GW_UPSTREAM_CA", "GW_ADMIN_SOCKET"}


def load_defaults():
    values = {}
    with open(os.path.join(HERE, "defaults.env")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, v = line.split("=", 1)
                values[k] = v
    return values


def substitute(text, values):
    out = []
    for line in text.splitlines(keepends=True):
        def repl(m, line=line):
            name = m.group(1)
            if name not in values:
                sys.exit(f"render.py: no value for ${{{name}}}")
            val = values[name]
            if "\n" in val:
                indent = " " * m.start()
                val = val.rstrip("\n").replace("\n", "\n" + indent)
            return val
        out.append(PLACEHOLDER.sub(repl, line))
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default=os.path.join(HERE, "envoy.yaml.tmpl"))
    ap.add_argument("--filter-config", required=True, help="gw_edge plugin configuration (JSON)")
    ap.add_argument("--upstream-plaintext", action="store_true",
                    help="plain HTTP/2 to the sidecar (development only; default: mutual TLS)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()

    values = load_defaults()
    for k in list(values):
        if k in os.environ:
            values[k] = os.environ[k]
    for kv in a.set:
        if "=" not in kv:
            sys.exit(f"render.py: --set {kv}: expected NAME=VALUE")
        k, v = kv.split("=", 1)
        if k not in values:
            sys.exit(f"render.py: unknown name {k}")
        values[k] = v
    for k in PATH_VARS:
        values[k] = os.path.abspath(values[k])

    with open(a.filter_config) as f:
        cfg = json.load(f)  # validates the JSON; the filter validates its meaning
    # The control routes run the stamp stage; they must be the filter's own, so the
    # paths chosen here are written into the filter configuration too.
    command_path = cfg.setdefault("command_path", "/api/control/commands")
    module_prefix = cfg.setdefault("module_route_prefix", "/api/control/module/")
    for name, v in (("command_path", command_path), ("module_route_prefix", module_prefix)):
        if not isinstance(v, str) or not v.startswith("/") or '"' in v or "\\" in v:
            sys.exit(f"render.py: filter configuration: {name} must be a path starting with '/'")
        if v.startswith("/api/realtime"):
            # That route streams (no buffer filter): a command there would reach the
            # upstream before the filter verified its body.
            sys.exit(f"render.py: filter configuration: {name} must not be under /api/realtime")
    values["GW_COMMAND_PATH"] = command_path
    values["GW_MODULE_ROUTE_PREFIX"] = module_prefix
    values["GW_FILTER_CONFIG"] = json.dumps(cfg, indent=2)
    if not a.upstream_plaintext:
        with open(os.path.join(HERE, "upstream-mtls.yaml.part")) as f:
            part = "".join(l for l in f if not l.startswith("#"))
        values["GW_SIDECAR_TRANSPORT"] = substitute(part, values)
    else:
        values["GW_SIDECAR_TRANSPORT"] = "# plaintext HTTP/2 to the sidecar: development only (--upstream-plaintext)"

    with open(a.template) as f:
        rendered = substitute(f.read(), values)
    # The rendered file holds the filter's JWT keys and edge key: readable by its owner only.
    fd = os.open(a.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(rendered)


if __name__ == "__main__":
    main()
