"""Property-based fuzzing of live services (issue 18): hypothesis generates requests over every field of
ModelInfer, Classify/ClassifyStream and the registry's requests, plus raw protobuf bytes, and sends them
to a registry, two workers and a gateway running as processes on loopback (both ports of the gateway and of
a worker). Property, checked on every answer: its status is in the error table (OK or a status of
../shared/STYLE.md section 5; INTERNAL, UNKNOWN and any other are findings), no call hangs, no service
process dies (pids unchanged); at the end each service's RSS is below its RSS at start plus RSS_BOUND.

The run is reproducible: derandomized, no example database, and no shrinking (a finding is reported with
the smallest request seen of its kind). The tests together send at least MIN_REQUESTS requests."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy

from fovea.v1 import image_pb2
from inference import grpc_predict_v2_pb2 as pb
from tests.e2e.fuzzing import (
    GATEWAY_PORTS,
    IMAGE,
    IMAGE_SAMPLES,
    OIP,
    REGISTRY,
    Call,
    Fuzzer,
    classify_calls,
    model_infer_calls,
    other_public_calls,
    raw_byte_calls,
    registry_calls,
    unary,
)
from tests.e2e.live import service_stats, start_live

# FOVEA_FUZZ_SCALE=10 sends ten times as many (a longer local run); CI runs scale 1.
SCALE = float(os.environ.get("FOVEA_FUZZ_SCALE", "1"))
MIN_REQUESTS = 5000
# A generous bound for caches and allocator arenas; a leak of one call's buffers would pass it within the run.
RSS_BOUND = 64 * 1024 * 1024
# Two more rounds of the oversized calls may add this much at most: each round sends some 300 MB.
RSS_REPEAT_BOUND = 32 * 1024 * 1024

pytestmark = pytest.mark.timeout(600)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    live = start_live(tmp_path_factory.mktemp("fuzz"), workers=2, gateways=1)
    f = Fuzzer(live)
    f.wait_serving()
    f.start_stats = service_stats(live.services())  # type: ignore[attr-defined]
    yield f
    # the whole list of findings, for whoever reads the run
    out = pathlib.Path(__file__).resolve().parents[2] / ".pytest_cache" / "fuzz_findings.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"{f.sent} requests, {f.restarts} restarts\n{f.report()}\n\nanswers:\n{f.histogram()}\n")
    f.close()
    live.stop()


def run(fuzzer: Fuzzer, strategy: SearchStrategy[Call], examples: int) -> None:
    @fuzz_settings(examples)
    @given(call=strategy)
    def send(call: Call) -> None:
        fuzzer.send(call)

    send()


def assert_clean(fuzzer: Fuzzer, prefix: str) -> None:
    found = fuzzer.findings_for(lambda method: method.startswith(prefix))
    assert not found, f"{len(found)} findings:\n" + fuzzer.report(found)


def test_model_infer_on_every_port(fuzzer: Fuzzer) -> None:
    run(fuzzer, model_infer_calls(), 700)  # to three targets: the gateway's two paths and a worker
    assert_clean(fuzzer, OIP + "ModelInfer")


def test_classify_and_classify_stream(fuzzer: Fuzzer) -> None:
    run(fuzzer, classify_calls(), 400)
    assert_clean(fuzzer, IMAGE + "Classify")


def test_other_public_calls(fuzzer: Fuzzer) -> None:
    run(fuzzer, other_public_calls(), 250)
    found = fuzzer.findings_for(lambda m: m.startswith((IMAGE, OIP)) and not m.endswith(("ModelInfer", "Classify")))
    assert not found, f"{len(found)} findings:\n" + fuzzer.report(found)


def test_registry_requests(fuzzer: Fuzzer) -> None:
    run(fuzzer, registry_calls(), 800)
    assert_clean(fuzzer, REGISTRY)


def test_random_protobuf_bytes(fuzzer: Fuzzer) -> None:
    run(fuzzer, raw_byte_calls(), 1000)
    raw = [f for f in fuzzer.findings_for(lambda _: True) if "raw bytes" in f.call.described]
    assert not raw, f"{len(raw)} findings:\n" + fuzzer.report(raw)


def test_both_gateway_paths_agree(fuzzer: Fuzzer) -> None:
    """Runs after the calls above: every call sent to the gateway with a key the front serves itself and with its
    twin that the front relays to the Python server got the same status on each."""
    found = [f for f in fuzzer.findings.values() if f.kind == "ports disagree"]
    assert not found, f"{len(found)} findings:\n" + fuzzer.report(found)


def test_no_restarts_and_memory_bounded(fuzzer: Fuzzer) -> None:
    """After the generated requests: their count, the same processes alive, and RSS within the bound."""
    assert fuzzer.sent >= MIN_REQUESTS * min(SCALE, 1), fuzzer.sent
    start = fuzzer.start_stats  # type: ignore[attr-defined]
    end = service_stats(fuzzer.live.services())
    print(
        f"\n{fuzzer.sent} requests; RSS MB start -> end:",
        {n: (start[n].rss_bytes >> 20, end[n].rss_bytes >> 20) for n in end},
    )
    dead = fuzzer.report([f for f in fuzzer.findings.values() if f.kind == "process died"])
    assert fuzzer.restarts == 0, f"{fuzzer.restarts} service restarts:\n{dead}"
    assert {n: s.pid for n, s in end.items()} == fuzzer.pids
    grown = {
        n: (s.rss_bytes - start[n].rss_bytes) >> 20
        for n, s in end.items()
        if s.rss_bytes > start[n].rss_bytes + RSS_BOUND
    }
    assert not grown, f"RSS grew past {RSS_BOUND >> 20} MiB (MiB): {grown}"


def test_oversized_messages_do_not_accumulate(fuzzer: Fuzzer) -> None:
    """Fields past every limit, as explicit calls: a 21 MiB image (over max_image_bytes), 65 images, a raw
    tensor past the 64 MiB message limit; with and without credentials, on both gateway ports. Each must be
    answered from the table, and memory must not accumulate: one such call may lift RSS by some multiple of
    its size (copies the allocator keeps for reuse), but a second and third round of them must not add more
    than RSS_REPEAT_BOUND."""
    big_image = IMAGE_SAMPLES[0] + bytes(21 * 2**20)
    many = image_pb2.ClassifyRequest(model="colors", images=[image_pb2.Image(data=IMAGE_SAMPLES[0])] * 65)
    huge = pb.ModelInferRequest(model_name="ident")
    huge.inputs.add(name="input", datatype="FP32", shape=[2**22 + 1, 4])
    huge.raw_input_contents.append(bytes(16 * (2**22 + 1)))
    calls = [
        unary(
            GATEWAY_PORTS,
            IMAGE + "Classify",
            "infer",
            image_pb2.ClassifyRequest(model="colors", images=[image_pb2.Image(data=big_image)]),
        ),
        unary(GATEWAY_PORTS, IMAGE + "Classify", "infer", many),
        unary(GATEWAY_PORTS, OIP + "ModelInfer", "infer", huge),
        unary(GATEWAY_PORTS, OIP + "ModelInfer", "none", huge),
    ]
    del big_image, huge
    counts = {group: f.count for group, f in fuzzer.findings.items()}
    rss = []
    for _ in range(3):
        for call in calls:
            fuzzer.send(call)
        rss.append({n: s.rss_bytes for n, s in service_stats(fuzzer.live.services()).items()})
    new = [f for group, f in fuzzer.findings.items() if f.count > counts.get(group, 0)]
    assert not new, fuzzer.report(new)
    print("\nRSS MB after each round of oversized calls:", {n: [r[n] >> 20 for r in rss] for n in rss[0]})
    grown = {n: (rss[2][n] - rss[0][n]) >> 20 for n in rss[0] if rss[2][n] > rss[0][n] + RSS_REPEAT_BOUND}
    assert not grown, f"RSS grew past {RSS_REPEAT_BOUND >> 20} MiB over two more rounds (MiB): {grown}"
