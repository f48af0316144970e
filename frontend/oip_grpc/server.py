"""The gRPC frontend process: a grpc.aio server of GRPCInferenceService on its own port.

One event loop serves every call; the broker client is made inside it. SIGINT and SIGTERM stop
it: calls in flight get a grace period, then the process exits.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from importlib import metadata

import grpc

from broker.client import AsyncClient, Client
from broker.curve import PeerKeys
from metrics import GrpcMetrics, new_registry, serve_metrics, tracing

from .calls import Calls
from .proto import grpc_service_pb2_grpc as pb_grpc
from .service import InferenceService
from .settings import GrpcSettings

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0


def _version() -> str:
    try:
        return metadata.version("fractal-ml-server")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class GrpcServer:
    """Serve until `stop()`; build it in main(), run it with run()."""

    def __init__(self, settings: GrpcSettings):
        self.settings = settings
        self.curve = PeerKeys.from_files(settings.curve_secret_key, settings.curve_broker_key)  # ConfigError
        self.registry = new_registry("fractal_grpc")
        self.metrics = GrpcMetrics(self.registry, enabled=settings.metrics_port != 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_early = False

    def run(self) -> None:
        asyncio.run(self._serve())

    def stop(self) -> None:
        """Ask the server to stop; safe from a signal handler or another thread."""
        if self._loop is None or self._stopping is None:
            self._stop_early = True
        else:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def _serve(self) -> None:
        s = self.settings
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # NOTE: through the loop, so a signal wakes it even when a gRPC thread received it
            self._loop.add_signal_handler(sig, self._stopping.set)
        if self._stop_early:
            return
        serve_metrics(s.metrics_host, s.metrics_port, self.registry, "grpc")
        tracing.configure("grpc", s.tracing)
        client = AsyncClient(s.broker, s.service, s.timeout_s, curve=self.curve)
        mmi = Client(s.broker, s.service, s.timeout_s, curve=self.curve)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", s.max_message_bytes),
                                          ("grpc.max_send_message_length", s.max_message_bytes),
                                          ("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(client, mmi, Calls(s.timeout_s, s.admin_token, s.api_token, self.metrics), _version()),
            server)
        try:
            port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc)
            await client.aclose()
            mmi.close()
            raise SystemExit(2) from None
        await server.start()
        log.info("gRPC frontend on %s:%d (GRPCInferenceService), broker %s", s.host, port, s.broker)
        try:
            await self._stopping.wait()
            log.info("stopping")
        finally:
            await server.stop(STOP_GRACE_S)
            await client.aclose()
            mmi.close()
            tracing.shutdown()
            log.info("stopped")
