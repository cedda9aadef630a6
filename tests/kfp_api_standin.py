"""A stand-in for the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, for the real kfp.Client.

No KFP cluster is reachable in tests. This serves just what kfp.Client (2.17) calls to submit a
run and create a recurring run: ``GET healthz`` (its multi-user probe), experiments list (by
name) and create, runs create, recurring runs create. It records each request as a server
receives it (method, path, query, JSON body) with its answer; refuses what a real API server
refuses at creation (an unknown experiment, a pipeline spec that does not parse, runtime
parameters the spec does not declare or types it does not match, a cron without seconds,
max_concurrency outside 1..10); and answers errors as KFP's gateway does (``{"code",
"message"}``). Any endpoint can be made to fail on purpose through ``failures``.

It runs in a thread of the test process, on an ephemeral port, for at most ``limit_s``: then it
closes its socket, so a client that never finishes fails instead of hanging the suite.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

API = "/apis/v2beta1"
# gRPC status codes KFP's REST gateway puts in error bodies, with the HTTP status it answers
INVALID_ARGUMENT, NOT_FOUND = 3, 5
HTTP_STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404}
# inputDefinitions parameterType -> the JSON types a runtime parameter of it may have
PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "STRUCT": (dict,),
    "LIST": (list,),
}


@dataclass(frozen=True)
class Request:
    """One request as the server received it, and what it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    status: int
    answer: dict


@dataclass
class KfpApiStandIn:
    """What the server saw and holds. ``failures[(method, path)] = (http_status, message)``
    makes that endpoint answer an error instead."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    failures: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)

    def bodies(self, method: str, path: str) -> list[Any]:
        """JSON bodies of every ``method`` request to ``path`` (under /apis/v2beta1)."""
        return [r.body for r in self.requests if (r.method, r.path) == (method, API + path)]

    # ---- the API -------------------------------------------------------------------------
    def answer(self, method: str, path: str, query: dict, body: Any) -> tuple[int, dict]:
        if (method, path) in self.failures:
            status, message = self.failures[(method, path)]
            return status, {"code": 13 if status >= 500 else 3, "message": message}
        route = {
            ("GET", f"{API}/healthz"): lambda: {"multi_user": False, "tag_name": "stand-in"},
            ("GET", f"{API}/experiments"): lambda: self._list_experiments(query),
            ("POST", f"{API}/experiments"): lambda: self._create_experiment(body),
            ("POST", f"{API}/runs"): lambda: self._create_run(body),
            ("POST", f"{API}/recurringruns"): lambda: self._create_recurring_run(body),
        }.get((method, path))
        if route is None:
            return 404, {"code": NOT_FOUND, "message": f"stand-in: no route {method} {path}"}
        try:
            return 200, route()
        except Refused as e:
            return HTTP_STATUS[e.code], {"code": e.code, "message": str(e)}

    def _list_experiments(self, query: dict) -> dict:
        (raw,) = query.get("filter", ['{"predicates": []}'])
        found = list(self.experiments.values())
        for p in json.loads(raw)["predicates"]:
            if (p["key"], p["operation"]) != ("display_name", 1):  # EQUALS
                raise Refused(INVALID_ARGUMENT, f"stand-in: unsupported filter {p}")
            found = [e for e in found if e["display_name"] == p["stringValue"]]
        return {"experiments": found, "total_size": len(found)} if found else {}

    def _create_experiment(self, body: dict) -> dict:
        name = body.get("display_name") or ""
        if not name:
            raise Refused(INVALID_ARGUMENT, "experiment name is empty")
        if any(e["display_name"] == name for e in self.experiments.values()):
            raise Refused(INVALID_ARGUMENT, f"experiment {name!r} already exists")
        exp = {"experiment_id": _new_id(), "display_name": name, "storage_state": "AVAILABLE"}
        self.experiments[exp["experiment_id"]] = exp
        return exp

    def _create_run(self, body: dict) -> dict:
        self._check_run_body(body)
        return {
            "run_id": _new_id(),
            "display_name": body["display_name"],
            "experiment_id": body["experiment_id"],
            "state": "PENDING",
        }

    def _create_recurring_run(self, body: dict) -> dict:
        self._check_run_body(body)
        cron = body.get("trigger", {}).get("cron_schedule", {}).get("cron", "")
        if len(cron.split()) != 6:  # KFP parses it with seconds first (robfig/cron)
            raise Refused(INVALID_ARGUMENT, f"invalid cron schedule {cron!r}: want 6 fields")
        if not 1 <= int(body.get("max_concurrency", 1)) <= 10:
            raise Refused(INVALID_ARGUMENT, "max concurrency must be between 1 and 10")
        return {
            "recurring_run_id": _new_id(),
            "display_name": body["display_name"],
            "experiment_id": body["experiment_id"],
            "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
        }

    def _check_run_body(self, body: dict) -> None:
        if body.get("experiment_id") not in self.experiments:
            raise Refused(NOT_FOUND, f"experiment {body.get('experiment_id')!r} not found")
        if not body.get("display_name"):
            raise Refused(INVALID_ARGUMENT, "run name is empty")
        doc = body.get("pipeline_spec") or {}
        doc = doc.get("pipeline_spec", doc)  # kfp nests it beside a platform_spec, if any
        try:
            spec = json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())
        except json_format.ParseError as e:
            raise Refused(INVALID_ARGUMENT, f"invalid pipeline spec: {e}") from None
        declared = spec.root.input_definitions.parameters
        given = body.get("runtime_config", {}).get("parameters", {})
        for key, value in given.items():
            if key not in declared:
                raise Refused(INVALID_ARGUMENT, f"pipeline has no input parameter {key!r}")
            kind = pipeline_spec_pb2.ParameterType.ParameterTypeEnum.Name(
                declared[key].parameter_type
            )
            ok = isinstance(value, PARAMETER_TYPES[kind])
            if not ok or (isinstance(value, bool) and kind != "BOOLEAN"):
                raise Refused(INVALID_ARGUMENT, f"parameter {key}={value!r} is not {kind}")
        missing = [
            k for k, d in declared.items() if not d.is_optional and not d.HasField("default_value")
        ]
        missing = [k for k in missing if k not in given]
        if missing:
            raise Refused(INVALID_ARGUMENT, f"missing input parameter(s) {missing}")


def cached_tasks(pipeline_spec: dict) -> list[str]:
    """Tasks of a submitted spec, at any depth (``dsl.If`` bodies, sub-pipelines), that a KFP
    backend would serve from cache: ``component/task`` names."""
    spec = pipeline_spec.get("pipeline_spec", pipeline_spec)
    dags = {"root": spec["root"]["dag"]}
    dags |= {name: c["dag"] for name, c in spec.get("components", {}).items() if "dag" in c}
    return [
        f"{name}/{task}"
        for name, dag in dags.items()
        for task, t in dag.get("tasks", {}).items()
        if t.get("cachingOptions", {}).get("enableCache", False)  # JSON leaves false out
    ]


class Refused(Exception):
    """A request the API server refuses, with its gRPC status code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _new_id() -> str:
    return str(uuid.uuid4())


def _handler(standin: KfpApiStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a client that stops mid-request frees its thread

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            query = parse_qs(parts.query)
            status, answer = standin.answer(self.command, parts.path, query, body)
            standin.requests.append(Request(self.command, parts.path, query, body, status, answer))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:  # requests are recorded, not printed
            pass

    return Handler


@contextmanager
def kfp_api_standin(limit_s: float = 120) -> Iterator[KfpApiStandIn]:
    """Serve the stand-in on 127.0.0.1 (an ephemeral port) for the block, ``limit_s`` at most."""
    standin = KfpApiStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(standin))
    server.daemon_threads = True
    standin.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    deadline = threading.Timer(limit_s, _stop, (server,))
    deadline.start()
    try:
        yield standin
    finally:
        deadline.cancel()
        _stop(server)
        thread.join(timeout=10)


def _stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()  # a closed socket refuses; an open one would leave clients waiting
