"""Regenerate frontend/oip_grpc/proto/*_pb2*.py from the .proto files beside them.

Needs grpcio-tools (`pip install grpcio-tools`), which users never need: the generated modules are
committed. protoc writes `import model_config_pb2` for the proto's `import "model_config.proto"`;
this script makes it a relative import so the modules live inside our package.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent.parent / "frontend" / "oip_grpc" / "proto"
SERVICE_PROTO = "grpc_service.proto"  # the only one with a service: it alone gets a _pb2_grpc module
PROTOS = ["model_config.proto", SERVICE_PROTO]


def main() -> int:
    for proto in PROTOS:
        services = [f"--grpc_python_out={PROTO_DIR}"] if proto == SERVICE_PROTO else []
        code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={PROTO_DIR}", f"--pyi_out={PROTO_DIR}",
                            *services, str(PROTO_DIR / proto)])
        if code != 0:
            print(f"protoc failed on {proto}", file=sys.stderr)
            return code
    for path in PROTO_DIR.glob("*_pb2*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2)( as \w+)?$", r"from . import \1\2", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    print(f"generated into {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
