"""The gateway's two public faces: fovea.v1.ImageService and inference.GRPCInferenceService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from fovea import oip, tracing
from fovea.errors import FoveaError
from fovea.names import check_name
from fovea.registry_link import RegistryLink, upstream
from fovea.rpc import call_metadata, principal
from fovea.v1 import image_pb2, image_pb2_grpc, model_pb2, registry_pb2
from gateway import statistics
from gateway.auth import check_model_access
from gateway.service import Gateway
from gateway.streams import ordered
from gateway.validate import check_version
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

SERVER_NAME = "fovea-gateway"


def may_use(api_key: Any, model: str) -> bool:
    """Whether the key's role and model patterns allow this model (for filtering lists)."""
    try:
        check_model_access(api_key, model)
        return True
    except FoveaError:
        return False


async def charged(gateway: Gateway) -> registry_pb2.ApiKey:
    """The caller's key, charged one request: for calls that reach the registry or every worker."""
    api_key = principal.get()
    await gateway.quota(api_key, 0)
    return api_key


class ImageServicer(image_pb2_grpc.ImageServiceServicer):
    def __init__(self, gateway: Gateway, link: RegistryLink) -> None:
        self.gateway = gateway
        self.link = link

    async def Classify(self, request: image_pb2.ClassifyRequest, context: Any) -> image_pb2.ClassifyResponse:
        tracing.annotate(images=len(request.images))
        return await self.gateway.classify(principal.get(), request, self.gateway.timeout_s(context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[image_pb2.ClassifyStreamRequest], context: Any
    ) -> AsyncIterator[image_pb2.ClassifyStreamResponse]:
        """Answers in request order with at most stream_window requests in flight.

        While the window is full the gateway stops reading the stream, so gRPC's
        HTTP/2 flow control slows the sender down. A failed item is answered with
        its status code and message; the stream goes on. Each item gets the
        stream's remaining deadline, or the default one when the stream has none.
        """
        api_key = principal.get()

        async def one(item: image_pb2.ClassifyStreamRequest) -> image_pb2.ClassifyStreamResponse:
            try:
                resp = await self.gateway.classify(api_key, item.request, self.gateway.timeout_s(context))
                return image_pb2.ClassifyStreamResponse(sequence=item.sequence, response=resp)
            except FoveaError as exc:
                return image_pb2.ClassifyStreamResponse(
                    sequence=item.sequence, error_code=exc.code.value[0], error_message=str(exc)
                )

        async for answer in ordered(request_iterator, self.gateway.config.stream_window, one):
            yield answer

    async def ListModels(
        self, request: image_pb2.ImageServiceListModelsRequest, context: Any
    ) -> image_pb2.ImageServiceListModelsResponse:
        api_key = await charged(self.gateway)
        try:
            resp = await self.link.stub.ListModels(
                model_pb2.ListModelsRequest(), metadata=call_metadata(self.link.token), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream(exc) from None
        return image_pb2.ImageServiceListModelsResponse(models=[m for m in resp.models if may_use(api_key, m.name)])

    async def GetModel(self, request: image_pb2.GetModelRequest, context: Any) -> image_pb2.GetModelResponse:
        check_name(request.model)
        check_model_access(await charged(self.gateway), request.model)
        mv = await self.gateway.resolve(request.model, request.version, request.alias)
        return image_pb2.GetModelResponse(model=mv)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(
            ready=any(
                ep.status.state == registry_pb2.WORKER_STATE_READY for ep in self.gateway.workers.endpoints.values()
            )
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        check_name(request.name)  # a name no model can have is the caller's mistake, not a model that is not ready
        check_model_access(await charged(self.gateway), request.name)
        version = check_version(request.version)
        try:
            mv = await self.gateway.resolve(request.name, version, "")
            return pb.ModelReadyResponse(ready=bool(self.gateway.workers.ready_on(mv.name, mv.version)))
        except (FoveaError, ValueError):
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        from fovea import __version__

        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=["classification", "model_configuration", "statistics"]
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        check_model_access(await charged(self.gateway), request.name)
        mv = await self.gateway.resolve(request.name, check_version(request.version), "")
        return oip.model_metadata(mv, [str(mv.version)])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        check_model_access(await charged(self.gateway), request.name)
        mv = await self.gateway.resolve(request.name, check_version(request.version), "")
        # Workers batch and enforce their own limit; a call the gateway forwards carries at most this many.
        return pb.ModelConfigResponse(config=oip.model_config(mv, self.gateway.config.max_images_per_forward))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self.gateway.infer(principal.get(), request, self.gateway.timeout_s(context))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        """The sum of the workers' statistics, for the models this key may use."""
        api_key = await charged(self.gateway)
        version = check_version(request.version)
        if request.name:
            check_model_access(api_key, request.name)
            await self.gateway.resolve(request.name, version, "")
        serving = [
            ep
            for ep in self.gateway.workers.endpoints.values()
            if not request.name or any(m.name == request.name for m in ep.status.models)
        ]
        reports = await statistics.gather(
            serving, request, self.gateway.internal_metadata(), min(self.gateway.timeout_s(context), 10.0)
        )
        merged = statistics.merge(reports)
        allowed = [st for st in merged.model_stats if may_use(api_key, st.name)]
        return pb.ModelStatisticsResponse(model_stats=allowed)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming call: answers in request order (each carries its request's id), with
        at most stream_window requests in flight; a failed request is answered with its status and
        message in error_message, and the stream goes on."""
        api_key = principal.get()

        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                resp = await self.gateway.infer(api_key, request, self.gateway.timeout_s(context))
                return pb.ModelStreamInferResponse(infer_response=resp)
            except FoveaError as exc:
                return pb.ModelStreamInferResponse(error_message=f"{exc.code.name}: {exc}")

        async for answer in ordered(request_iterator, self.gateway.config.stream_window, one):
            yield answer

    async def ModelInferBytes(self, request: bytes, context: Any) -> bytes:
        """ModelInfer as the gateway serves it: the request's bytes go to the worker, its answer's bytes back."""
        return await self.gateway.infer_bytes(principal.get(), request, self.gateway.timeout_s(context))
