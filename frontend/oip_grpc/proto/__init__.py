"""Triton's gRPC messages and service stubs, generated from the .proto files here (README.md)."""
