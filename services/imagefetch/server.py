"""Running the image-fetch service: its resources opened in order, the gRPC server, a clean stop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from renderflow.v1 import imagefetch_pb2_grpc

from services.imagefetch.config import Settings
from services.imagefetch.delivery import Deliverer
from services.imagefetch.instruments import Instruments
from services.imagefetch.service import open_service
from services.imagefetch.servicer import SERVICE_NAME, ImageFetchServicer
from shared.grpc_server import create_server, drain, start


@asynccontextmanager
async def running(settings: Settings, instruments: Instruments | None = None) -> AsyncIterator[int]:
    """Serves ImageFetchService on `settings.listen` and yields the bound port; on exit drains the
    calls in flight, then closes the deliveries' session, the fetches, the cache and the fetches'
    session."""
    instruments = instruments or Instruments.create()
    async with AsyncExitStack() as stack:
        service = await stack.enter_async_context(open_service(settings, instruments))
        deliverer = await stack.enter_async_context(Deliverer.open(settings, instruments))
        handle = create_server([SERVICE_NAME], token=settings.service_token)
        servicer = ImageFetchServicer(service, deliverer)
        imagefetch_pb2_grpc.add_ImageFetchServiceServicer_to_server(servicer, handle.server)
        port = await start(handle, settings.listen)
        stack.push_async_callback(drain, handle, settings.drain_grace_s)
        yield port
