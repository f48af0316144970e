"""Hostile JSON against a real `fractal serve`: every JSON route answers 400 in its own error shape."""
from __future__ import annotations

import http.client
import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.client import Client
from broker.errors import BadInput

from .harness import Served, wait_for

pytestmark = pytest.mark.slow  # starts real processes

DEEP = b"[" * 200_000 + b"]" * 200_000

# Each route's body with X where the case goes, and the shape its errors take.
ROUTES = {
    "seed GET prediction": ("GET", "/api/v1/models/iris.onnx/prediction", b'{"values": [X, 5, 1, 4]}', "seed"),
    "seed POST prediction": ("POST", "/api/v1/models/iris.onnx/prediction", b'{"values": [X, 5, 1, 4]}', "seed"),
    "model description": ("POST", "/api/v1/models/iris.onnx", b'{"model_description": X}', "seed"),
    "sendtomodelhost": ("POST", "/api/test/sendtomodelhost", b'{"data": [X, 2]}', "seed"),
    "v2 infer": ("POST", "/v2/models/iris.onnx/infer", b'{"inputs": [{"name": "float_input", "shape": [1, 4], '
                                                        b'"datatype": "FP32", "data": [X, 5, 1, 4]}]}', "v2"),
}
# Each case: what replaces X, and what the error must say.
CASES = {
    "NaN": (b"NaN", "NaN is not JSON"),
    "Infinity": (b"Infinity", "Infinity is not JSON"),
    "-Infinity": (b"-Infinity", "-Infinity is not JSON"),
    "1e400": (b"1e400", "1e400 is out of float64 range"),
    "200,000 deep": (DEEP, "nesting deeper than 64"),
    "invalid UTF-8": (b'"caf\xe9"', "invalid UTF-8 at byte"),
    "bare huge integer": (b"123456789012345678901234567890",
                          "the integer 123456789012345678901234567890 is beyond 64 bits"),
    "lone surrogate": (b'"\\ud800"', "lone UTF-16 surrogate"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("strict-json"))
    yield served
    assert "Traceback" not in served.log()
    assert served.stop() == 0


def send(server: Served, method: str, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def error_text(shape: str, status: int, answer: dict) -> str:
    """The error's description, after checking the route's error shape."""
    if shape == "v2":
        assert set(answer) == {"error"}, answer
        return answer["error"]
    assert set(answer) == {"http_status"} and answer["http_status"]["code"] == status, answer
    assert answer["http_status"]["name"] == "Bad Request"
    return answer["http_status"]["description"]


def predicts(server: Served) -> bool:
    status, answer = send(server, "POST", "/api/v1/models/iris.onnx/prediction", b'{"values": [2, 5, 1, 4]}')
    return status == 200 and answer["values"] == [1]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("route", ROUTES)
def test_each_hostile_value_is_a_400_that_names_it(server, route, case):
    method, path, template, shape = ROUTES[route]
    value, message = CASES[case]
    status, answer = send(server, method, path, template.replace(b"X", value))
    assert status == 400
    assert message in error_text(shape, status, answer)
    assert predicts(server)


@pytest.mark.parametrize("route", ROUTES)
def test_duplicate_keys_are_a_400_that_names_the_key(server, route):
    method, path, template, shape = ROUTES[route]
    body = template.replace(b"X", b"1")
    key = body[body.index(b'"'):body.index(b":") + 1]  # the route's first key, said twice
    status, answer = send(server, method, path, b"{" + key + b" 0, " + body[1:])
    assert status == 400
    assert f"duplicate key {key[1:-2].decode()!r}" in error_text(shape, status, answer)


FLOAT32_OVERFLOW = "1e+39 is out of float32 range for input 'float_input'"


@pytest.mark.parametrize("route, datatype, value, message", [
    ("seed GET prediction", None, b"1e39", FLOAT32_OVERFLOW),
    ("seed POST prediction", None, b"-1e39", "-" + FLOAT32_OVERFLOW),
    ("v2 infer", "FP32", b"1e39", FLOAT32_OVERFLOW),  # refused where the frontend reads the v2 datatype
    ("v2 infer", "FP64", b"1e39", FLOAT32_OVERFLOW),  # taken as FP64, refused where the worker converts it
    ("v2 infer", "INT32", b"1099511627776", "1099511627776 is out of int32 range for input 'float_input'"),
    ("v2 infer", "INT64", b"1e20", "1e+20 is out of int64 range for input 'float_input'"),
])
def test_numbers_beyond_the_inputs_dtype_are_a_400_naming_the_input(server, route, datatype, value, message):
    method, path, template, shape = ROUTES[route]
    body = template.replace(b"X", value)
    if datatype:
        body = body.replace(b'"FP32"', f'"{datatype}"'.encode())
    status, answer = send(server, method, path, body)
    assert status == 400
    assert message in error_text(shape, status, answer)


def test_a_float32_overflow_from_the_direct_client_is_bad_input(server):
    with Client(server.broker_url, timeout_s=10) as client:
        with pytest.raises(BadInput, match="out of float32 range for input 'float_input'"):
            client.predict("iris.onnx", {"float_input": np.array([[1e39, 5, 1, 4]])})
        inf = client.predict("iris.onnx", {"float_input": np.array([[np.inf, 5, 1, 4]])})  # inf was inf already
        assert inf["label"].shape == (1,)


def test_numbers_that_are_json_are_still_json_on_routes_without_a_dtype(server):
    status, answer = send(server, "POST", "/api/test/sendtomodelhost", b'{"data": [1e39, 18446744073709551615]}')
    assert status == 200 and [d["data"] for d in answer["data"]] == [1e39, 2**64 - 1]


def test_a_sidecar_that_breaks_the_rules_is_logged_and_ignored(server):
    sidecar = server.pool / "iris.onnx.json"
    original = sidecar.read_bytes()
    try:
        for broken, logged in [(b'{"description": NaN}', "NaN is not JSON"),
                               (b'{"description": "a", "description": "b"}', "duplicate key 'description'"),
                               (b'{"description": ' + DEEP + b"}", "nesting deeper than 64")]:
            sidecar.write_bytes(broken)
            status, answer = send(server, "GET", "/api/v1/models/iris.onnx", b"")
            assert status == 200 and answer["description"] == ""
            assert predicts(server)
            wait_for(lambda logged=logged: logged in server.log(), 10, f"the warning {logged!r}")
        assert "unreadable sidecar for iris.onnx, ignored: sidecar iris.onnx.json:" in server.log()
    finally:
        sidecar.write_bytes(original)
    status, answer = send(server, "GET", "/api/v1/models/iris.onnx", b"")
    assert answer["description"] == json.loads(original)["description"]


def test_the_deep_body_is_answered_as_fast_as_a_flat_one(server):
    def seconds(body: bytes) -> float:
        started = time.perf_counter()
        for _ in range(3):
            assert send(server, "POST", "/api/v1/models/iris.onnx/prediction", body)[0] == 400
        return time.perf_counter() - started
    flat = b'{"values": [' + b"1, " * 200_000 + b"1]}"  # as long, refused later: not 4 columns
    assert seconds(b'{"values": ' + DEEP + b"}") < 3 * seconds(flat) + 0.5


JSONISH = st.text(alphabet='[]{}":,\\ -+.0123456789eENaIfinityulr', max_size=80).map(str.encode)
HOSTILE = st.sampled_from([value for value, _ in CASES.values()])
TEMPLATED = st.tuples(st.sampled_from([t for _, _, t, _ in ROUTES.values()]),
                      st.binary(max_size=40) | JSONISH | HOSTILE).map(lambda tv: tv[0].replace(b"X", tv[1]))


def test_any_bytes_as_a_json_body_get_a_2xx_or_4xx_and_the_server_serves_on(server):
    @given(st.sampled_from(sorted(ROUTES)), st.binary(max_size=120) | JSONISH | TEMPLATED)
    @settings(max_examples=250, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def request(route, body):
        method, path, _, _ = ROUTES[route]
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        assert 200 <= resp.status < 500, (route, body, resp.status)

    request()
    assert predicts(server)


# Valid JSON in every field a route reads, so the route's own checks are fuzzed, not only the parser.
FIELDS = {
    "seed POST prediction": [b'{"values": X}', b'{"inputs": X}', b'{"inputs": {"float_input": X}}',
                             b'{"values": [2, 5, 1, 4], "outputs": X}'],
    "model description": [b'{"model_description": X}'],
    "sendtomodelhost": [b'{"data": X}'],
    "v2 infer": [b'{"inputs": X}', b'{"inputs": [X]}',
                 b'{"inputs": [{"name": "float_input", "shape": X, "datatype": "FP32", "data": [2, 5, 1, 4]}]}',
                 b'{"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": X, "data": [2, 5, 1, 4]}]}',
                 b'{"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": X}]}',
                 b'{"inputs": [{"name": X, "shape": [1, 4], "datatype": "FP32", "data": [2, 5, 1, 4]}]}',
                 b'{"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": [2, 5, 1, 4], '
                 b'"parameters": X}], "parameters": X, "outputs": X, "id": X}',
                 b'{"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": [2, 5, 1, 4]}], '
                 b'"outputs": [X], "parameters": {"binary_data_output": X}}'],
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-3, 5) | st.sampled_from(["float_input", "label", "FP32", "INT64", "BYTES", "all", ""]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["name", "shape", "datatype", "data", "parameters", "binary_data_size", "binary_data",
                         "float_input", "x"]), inner, max_size=4),
    max_leaves=12).map(lambda v: json.dumps(v).encode())


def test_any_json_in_any_field_gets_a_2xx_or_4xx(server):
    @given(st.sampled_from(sorted(FIELDS)).flatmap(lambda r: st.tuples(st.just(r), st.sampled_from(FIELDS[r]))),
           JSON_VALUES)
    @settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def request(route_template, value):
        route, template = route_template
        method, path, _, _ = ROUTES[route]
        status, answer = send(server, method, path, template.replace(b"X", value))
        assert 200 <= status < 500, (route, template.replace(b"X", value), status, answer)

    request()
    assert predicts(server)


V2_TENSOR = b'{"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": [2, 5, 1, 4]'


@pytest.mark.parametrize("body, message", [
    (b'{"inputs": [' + V2_TENSOR + b', "parameters": [1]}]}', "input 'float_input': 'parameters' must be an object"),
    (b'{"inputs": [' + V2_TENSOR + b'}], "parameters": 5}', "the request: 'parameters' must be an object"),
    (b'{"inputs": [' + V2_TENSOR + b'}], "outputs": [{"name": "label", "parameters": "x"}]}',
     "output 'label': 'parameters' must be an object"),
    (b'{"inputs": [{"name": "float_input", "shape": [true, 4], "datatype": "FP32", "data": [2, 5, 1, 4]}]}',
     "'shape' must be a list of non-negative integers"),
])
def test_v2_fields_of_the_wrong_json_type_are_a_400(server, body, message):
    """Found by test_any_json_in_any_field_gets_a_2xx_or_4xx: these were 500s."""
    status, answer = send(server, "POST", "/v2/models/iris.onnx/infer", body)
    assert status == 400 and message in error_text("v2", status, answer)


def test_answers_are_strict_json_too_non_finite_outputs_are_null(server):
    """diabetes (a linear model) overflows to NaN on 3e38 inputs: the answer says null, not NaN."""
    values = b"[" + b", ".join([b"3e38"] * 10) + b"]"
    for method, path, body, key in [
            ("POST", "/api/v1/models/diabetes.onnx/prediction", b'{"values": ' + values + b"}", "values"),
            ("POST", "/v2/models/diabetes.onnx/infer", b'{"inputs": [{"name": "float_input", "shape": [1, 10], '
                                                       b'"datatype": "FP32", "data": ' + values + b"}]}", "outputs")]:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, raw
        answer = json.loads(raw, parse_constant=lambda name, raw=raw: pytest.fail(f"{name} in {raw!r}"))
        if key == "values":
            assert answer["values"] == [[None]]
        else:
            assert answer["outputs"][0]["data"] == [None]  # v2 data is flat
