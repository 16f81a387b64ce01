"""A minimal Envoy external processor (ext_proc, gRPC) for bench/envoy_bench.py
variant (g): per domain, the same choice origin-policy makes for the bench
policies (the origin's cluster, in the cluster header, and the Host it is
asked for; the cluster's `auto_sni` takes SNI from that Host). Request headers
only; a domain it does not know gets a 404, as the bench policies' settings
say.

Run: .venv/bin/python bench/ext_proc_processor.py --port 18520 \
    --route bench.example.com=CLUSTER,HOST [--route ...]
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.type.v3 import http_status_pb2

CLUSTER_HEADER = "x-origin-cluster"


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode())
    )


class Processor(ext_proc_grpc.ExternalProcessorServicer):
    def __init__(self, routes: dict[str, tuple[str, str]]):
        # Answers built once: per request only the lookup is left.
        self.answers = {
            domain: ext_proc.ProcessingResponse(
                request_headers=ext_proc.HeadersResponse(
                    response=ext_proc.CommonResponse(
                        header_mutation=ext_proc.HeaderMutation(
                            set_headers=[header(CLUSTER_HEADER, cluster), header(":authority", host)]
                        ),
                        clear_route_cache=True,
                    )
                )
            )
            for domain, (cluster, host) in routes.items()
        }
        self.unknown = ext_proc.ProcessingResponse(
            immediate_response=ext_proc.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.NotFound),
                body=b"no origin policy for this host\n",
            )
        )
        self.other = ext_proc.ProcessingResponse()

    async def Process(self, requests, context):  # noqa: N802 (gRPC's name)
        async for request in requests:
            if not request.HasField("request_headers"):
                yield self.other
                continue
            authority = ""
            for h in request.request_headers.headers.headers:
                if h.key == ":authority":
                    authority = (h.raw_value or h.value.encode()).decode()
                    break
            domain = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
            yield self.answers.get(domain.lower(), self.unknown)


async def serve(port: int, routes: dict[str, tuple[str, str]]) -> None:
    server = grpc.aio.server()
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(Processor(routes), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", action="append", default=[], metavar="DOMAIN=CLUSTER,HOST")
    args = parser.parse_args()
    routes = {}
    for route in args.route:
        domain, _, target = route.partition("=")
        cluster, _, host = target.partition(",")
        routes[domain.lower()] = (cluster, host)
    asyncio.run(serve(args.port, routes))


if __name__ == "__main__":
    main()
