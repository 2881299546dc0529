"""Fault drills (issue 18) on a real multi-process cluster on loopback: Valkey, a registry, two workers and
two gateways, under steady load from four clients, two on each gateway's one public port.

The ledger. Every call a client sends is entered under its own id before it is sent; its answer is entered
when the call returns: "OK" (the answer carries the call's id and its own data back: the model echoes its
input, and each call's input is unique), "WRONG" (an OK answer with another call's id or data), or the
status code's name. The accounting, checked after every drill:
- lost: a sent id with no answer when the load has stopped (each call has a DEADLINE_S deadline, so every
  call ends); must be none;
- answered twice: an id with more than one answer, or an answer for an id never sent; must be none;
- wrong: must be none;
- failed: every other non-OK answer. Where a healthy replica remains: for a worker that dies, only calls in
  flight on it may fail, with UNAVAILABLE (such a call is not retried: it may be what killed the worker), at
  most two per client (each client has one call in flight; its next call may leave in the instant before the
  gateway sees the connection drop), all sent before the fault + 0.5 s; for a worker that hangs, only calls
  sent to it before the registry forgets it (its heartbeat TTL + 2 s), each ending at its deadline with
  DEADLINE_EXCEEDED. Where no worker remains, every call gets a prompt, clear UNAVAILABLE. Where only the
  registry or Valkey fails, no call may fail.

Recovery is measured from the fault (or from the repair, where the service must come back) to the first
successful call, and to the end of the last failed one; each bound is asserted and every time printed.

The poison drill runs on a second cluster whose workers sit behind CrashOnPoisonProxyFaultInjection: a TCP
proxy that SIGKILLs its worker when a call carrying the poison marker passes through it, as a call that
crashes the worker it reaches would."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from fovea.cluster import Service
from fovea.redis_server import free_port
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.e2e.live import WORKER_ENV, Live, restart, start_gateway, start_live, wait_ready

# serial: recovery bounds are a heartbeat TTL; scripts/test.sh runs these alone, after the parallel part
pytestmark = [pytest.mark.timeout(300), pytest.mark.serial]

DEADLINE_S = 2.0
PAUSE_S = 0.01  # between one client's calls: about 4 x 60 calls a second, leaving CPU for the services
HEARTBEAT_TTL_S = "3"  # the registry forgets a silent (stopped) worker after this long
POISON = b"POISON-FAULT-INJECTION-7f3a"


# --- the ledger and the load -----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: str
    sent_at: float
    done_at: float
    port: str
    detail: str = ""


@dataclass
class Ledger:
    sent: dict[str, tuple[str, float]] = field(default_factory=dict)
    answers: dict[str, list[Answer]] = field(default_factory=lambda: defaultdict(list))

    def send(self, rid: str, port: str, at: float) -> None:
        assert rid not in self.sent, f"id {rid} sent twice"
        self.sent[rid] = (port, at)

    def answer(self, rid: str, answer: Answer) -> None:
        self.answers[rid].append(answer)

    def check_accounting(self) -> None:
        """No call lost, answered twice, answered without being sent, or answered with another call's data."""
        lost = [rid for rid in self.sent if not self.answers.get(rid)]
        twice = [rid for rid, a in self.answers.items() if len(a) > 1]
        unsent = [rid for rid in self.answers if rid not in self.sent]
        wrong = [rid for rid, a in self.answers.items() if any(x.status == "WRONG" for x in a)]
        assert not (lost or twice or unsent or wrong), (
            f"lost {lost[:5]}, twice {twice[:5]}, unsent {unsent[:5]}, wrong {wrong[:5]}"
        )

    def all(self) -> list[Answer]:
        return [a for answers in self.answers.values() for a in answers]

    def failures(self) -> list[Answer]:
        return sorted((a for a in self.all() if a.status != "OK"), key=lambda a: a.sent_at)

    def first_ok_after(self, t: float, port: str | None = None) -> float | None:
        """Seconds from t to the end of the first successful call sent at or after t (on one port, if given)."""
        done = [a.done_at for a in self.all() if a.status == "OK" and a.sent_at >= t and port in (None, a.port)]
        return min(done) - t if done else None

    def summary(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for a in self.all():
            counts[a.status] += 1
        return f"{len(self.sent)} calls: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def ident_request(rid: str, value: float) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="ident", id=rid)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.full(4, value, np.float32).tobytes())
    return req


class Load:
    """Two clients per gateway (its one public port), each sending ident calls one after another, every call in
    the ledger."""

    def __init__(self, live: Live, key: str) -> None:
        self.ports = {}
        for i, gateway in enumerate(live.gateways):
            for client in ("a", "b"):
                self.ports[f"gateway{i}-{client}"] = gateway.address
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.ledger = Ledger()
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.client(i, p, a)) for i, (p, a) in enumerate(self.ports.items())]

    async def stop(self) -> Ledger:
        self.stopping = True
        await asyncio.gather(*self.tasks)
        return self.ledger

    async def client(self, index: int, port: str, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            seq = 0
            while not self.stopping:
                seq += 1
                rid, value = f"{port}-{seq}", float(index * 2**20 + seq)  # exact in FP32
                sent = time.monotonic()
                self.ledger.send(rid, port, sent)
                status, detail = await self.call(stub, rid, value)
                self.ledger.answer(rid, Answer(status, sent, time.monotonic(), port, detail))
                await asyncio.sleep(PAUSE_S)

    async def call(self, stub: pb_grpc.GRPCInferenceServiceStub, rid: str, value: float) -> tuple[str, str]:
        try:
            resp = await stub.ModelInfer(ident_request(rid, value), metadata=self.metadata, timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        echoed = resp.raw_output_contents and np.all(np.frombuffer(resp.raw_output_contents[0], np.float32) == value)
        return ("OK", "") if resp.id == rid and echoed else ("WRONG", f"id {resp.id!r}")


async def wait_all_ports_ok(live: Live, key: str, timeout_s: float = 30.0, streak: int = 1) -> float:
    """Seconds until each public port has answered `streak` calls in a row successfully (with a streak of
    some twenty, the gateways have reached both workers again: each call goes to one of two at random)."""
    start = time.monotonic()
    load = Load(live, key)
    runs = dict.fromkeys(load.ports, 0)
    while min(runs.values()) < streak and time.monotonic() - start < timeout_s:
        for port, address in load.ports.items():
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                while runs[port] < streak:
                    status, _ = await load.call(stub, "probe", 1.0)
                    runs[port] = runs[port] + 1 if status == "OK" else 0
                    if status != "OK":
                        break
        await asyncio.sleep(0.05)
    assert min(runs.values()) >= streak, f"no run of {streak} successful calls on every port within {timeout_s} s"
    return time.monotonic() - start


def listing(answers: list[Answer], since: float) -> str:
    return "\n".join(f"{a.port} {a.status} sent {a.sent_at - since:+.2f} s: {a.detail[:300]}" for a in answers)


def report(name: str, ledger: Ledger, **times: float | None) -> None:
    shown = ", ".join(f"{k} {v:.2f} s" if v is not None else f"{k} -" for k, v in times.items())
    print(f"\n[drill] {name}: {ledger.summary()}; {shown}")


# --- the cluster -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    c = start_live(
        tmp_path_factory.mktemp("drills"),
        workers=2,
        gateways=2,
        registry_env={"FOVEA_REGISTRY_HEARTBEAT_TTL_S": HEARTBEAT_TTL_S},
    )
    yield c
    quick_stop(c)


def quick_stop(live: Live) -> None:
    """Kill every service (these drills test faults, not shutdown; a graceful stop of each takes seconds)."""
    for service in live.services():
        service.kill()
    live.stop()


@pytest.fixture
async def steady(live: Live) -> str:
    """The cluster whole again (both workers running and routed to by every port); an infer key."""
    for worker in list(live.workers):
        if worker.proc.poll() is None:
            os.kill(worker.proc.pid, signal.SIGCONT)
        else:
            restart(live, worker)
    await asyncio.to_thread(wait_ready, live, 2)
    key = live.keys["infer"]
    await wait_all_ports_ok(live, key, streak=20)
    return key


async def run_load(live: Live, key: str, drill: Callable[[], object], after_s: float) -> tuple[Ledger, float]:
    """Load for a second, then the drill (in a thread, so that the load goes on), then after_s more seconds
    of load. Returns the ledger and the moment the drill started."""
    load = Load(live, key)
    load.start()
    await asyncio.sleep(1.0)
    fault_at = time.monotonic()
    await asyncio.to_thread(drill)
    await asyncio.sleep(after_s)
    return await load.stop(), fault_at


# --- the drills ------------------------------------------------------------------------------------------------


async def test_kill_9_a_worker(live: Live, steady: str) -> None:
    """One worker dies under load: only calls in flight on it fail, with UNAVAILABLE; recovery within 2 s."""
    ledger, fault_at = await run_load(live, steady, live.workers[0].proc.kill, after_s=4.0)
    ledger.check_accounting()
    failures = ledger.failures()
    last = max((a.done_at - fault_at for a in failures), default=0.0)
    report("kill -9 a worker", ledger, first_ok=ledger.first_ok_after(fault_at), last_failure_ends=last)
    assert all(a.status == "UNAVAILABLE" for a in failures), listing(failures, fault_at)
    assert all(a.sent_at < fault_at + 0.5 for a in failures), listing(failures, fault_at)
    assert len(failures) <= 2 * len(Load(live, steady).ports), listing(failures, fault_at)
    assert last < 2.0


async def test_no_worker_left_gets_clear_unavailable(live: Live, steady: str) -> None:
    """Both workers die: every call gets a prompt UNAVAILABLE (not a hang); after a restart of both, every
    port serves again within 15 s."""

    def kill_both() -> None:
        for w in live.workers:
            w.proc.kill()

    ledger, fault_at = await run_load(live, steady, kill_both, after_s=2.0)
    ledger.check_accounting()
    late = [a for a in ledger.all() if a.sent_at > fault_at + 0.5]
    assert late and all(a.status == "UNAVAILABLE" for a in late), {a.status for a in late}
    slowest = max(a.done_at - a.sent_at for a in late)
    restarted_at = time.monotonic()
    for w in list(live.workers):
        restart(live, w)
    up_s = time.monotonic() - restarted_at
    recovery = await wait_all_ports_ok(live, steady)
    report(
        "kill -9 both workers",
        ledger,
        slowest_unavailable=slowest,
        workers_restart=up_s,
        all_ports_ok_after_restart=up_s + recovery,
    )
    assert slowest < 1.0, "UNAVAILABLE should come at once when no worker is left"
    assert up_s + recovery < 15.0


async def test_sigstop_a_worker(live: Live, steady: str) -> None:
    """A worker hangs (SIGSTOP): calls on it end at their deadline, the registry forgets it after its heartbeat
    TTL, and no call sent later than TTL + 2 s after the hang fails; after SIGCONT it serves again."""
    stopped = live.workers[1]
    ledger, fault_at = await run_load(live, steady, lambda: os.kill(stopped.proc.pid, signal.SIGSTOP), after_s=7.0)
    os.kill(stopped.proc.pid, signal.SIGCONT)
    ledger.check_accounting()
    failures = ledger.failures()
    last = max((a.done_at - fault_at for a in failures), default=0.0)
    report(
        "SIGSTOP a worker",
        ledger,
        first_ok=ledger.first_ok_after(fault_at),
        last_failed_call_sent=max((a.sent_at - fault_at for a in failures), default=0.0),
        last_failure_ends=last,
    )
    assert all(a.status in ("DEADLINE_EXCEEDED", "UNAVAILABLE") for a in failures), failures
    assert all(a.done_at - a.sent_at < DEADLINE_S + 0.5 for a in failures), "a call outlived its deadline"
    assert all(a.sent_at - fault_at < float(HEARTBEAT_TTL_S) + 2.0 for a in failures)
    assert last < float(HEARTBEAT_TTL_S) + 2.0 + DEADLINE_S + 0.5
    back = time.monotonic()
    await asyncio.to_thread(wait_ready, live, 2)
    print(f"[drill] SIGCONT: the worker is ready in the registry again after {time.monotonic() - back:.2f} s")


async def test_restart_valkey(live: Live, steady: str) -> None:
    """Valkey stops for 1.5 s and comes back on its data: serving never notices (keys and routes are cached);
    the registry answers again, and a key made after the restart works on every port, within 10 s."""
    redis = live.cluster.redis
    assert redis is not None

    times: dict[str, float] = {}

    def bounce() -> None:
        redis.stop()
        time.sleep(1.5)
        redis.start()
        times["registry_answers"] = until_registry_answers(live)

    ledger, fault_at = await run_load(live, steady, bounce, after_s=1.0)
    key_s = await new_key_works(live)
    ledger.check_accounting()
    report(
        "restart Valkey", ledger, registry_answers_after_valkey_is_back=times["registry_answers"], new_key_works=key_s
    )
    assert not ledger.failures(), ledger.failures()[:5]
    assert key_s < 10.0


async def test_kill_9_the_registry_and_restart_it(live: Live, steady: str) -> None:
    """The registry dies for 1.5 s: serving goes on from the gateways' caches with no failed call; after its
    restart a key made then works on every port within 10 s."""

    def bounce() -> None:
        live.registry.proc.kill()
        time.sleep(1.5)
        restart(live, live.registry)

    ledger, fault_at = await run_load(live, steady, bounce, after_s=1.0)
    key_s = await new_key_works(live)
    ledger.check_accounting()
    report("kill -9 the registry", ledger, new_key_works_after_restart=key_s)
    assert not ledger.failures(), ledger.failures()[:5]
    assert key_s < 10.0


def until_registry_answers(live: Live, timeout_s: float = 20.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            live.rc.list_workers("ident")
            return time.monotonic() - start
        except grpc.RpcError:
            time.sleep(0.05)
    raise AssertionError("the registry did not answer again")


async def new_key_works(live: Live, timeout_s: float = 20.0) -> float:
    """Seconds until a key made now (the registry must verify it) succeeds on every public port."""
    start = time.monotonic()
    while True:
        try:
            key = (await asyncio.to_thread(live.rc.create_key, "infer"))[1]
            break
        except grpc.RpcError:
            assert time.monotonic() - start < timeout_s, "the registry never made a key"
            await asyncio.sleep(0.1)
    await wait_all_ports_ok(live, key, timeout_s)
    return time.monotonic() - start


# --- the poison call -------------------------------------------------------------------------------------------


class CrashOnPoisonProxyFaultInjection:
    """Fault injection: a TCP proxy in front of one worker's port that SIGKILLs the worker the moment a call
    carrying POISON passes through it (before forwarding those bytes), like a request that crashes the worker
    it reaches. Gateways reach the worker only through it (the worker advertises the proxy's address)."""

    def __init__(self, worker_port: int) -> None:
        self.port = free_port()
        self.worker_port = worker_port
        self.pid = 0
        self.kills = 0
        self.killed = False  # until track() gives it the restarted worker: refuse, as the dead port would
        self.watch: tuple[bytes, ...] = ()  # markers to look for in what passes to the worker
        self.seen: set[bytes] = set()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    def track(self, pid: int) -> None:
        self.pid, self.killed = pid, False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Connecting to a port nobody listens on can connect the socket to itself (TCP simultaneous open on
        # an ephemeral port), which would then keep the restarted worker from binding it.
        if self.killed:
            client_w.close()
            return
        try:
            worker_r, worker_w = await asyncio.open_connection("127.0.0.1", self.worker_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pump(client_r, worker_w, True), self._pump(worker_r, client_w, False))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to_worker: bool) -> None:
        tail = b""
        try:
            while data := await reader.read(65536):
                if to_worker and POISON in tail + data and self.pid:
                    os.kill(self.pid, signal.SIGKILL)
                    self.kills += 1
                    self.killed = True
                    break
                if to_worker:
                    self.seen.update(m for m in self.watch if m in tail + data)
                tail = data[-len(POISON) :]
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class PoisonCluster:
    live: Live
    proxies: dict[str, CrashOnPoisonProxyFaultInjection]

    def start_worker(self, name: str) -> Service:
        """A worker behind its proxy: it listens on the proxy's worker_port and advertises the proxy."""
        proxy = self.proxies[name]
        return self.live.cluster.start_worker(
            self.live.registry.address,
            ["colors", "ident"],
            name=name,
            port=proxy.worker_port,
            FOVEA_WORKER_ADVERTISE_ADDRESS=f"127.0.0.1:{proxy.port}",
            **WORKER_ENV,
        )

    def restart_dead(self) -> None:
        for i, old in enumerate(self.live.workers):
            if old.proc.poll() is not None:
                self.live.workers[i] = self.start_worker(old.name)
                self.live.cluster.services.remove(old)

    def track_pids(self) -> None:
        for w in self.live.workers:
            self.proxies[w.name].track(w.proc.pid)


@pytest.fixture(scope="module")
def poison_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoisonCluster]:
    """Two workers behind crash-on-poison proxies (each advertises its proxy as its one address, so that every
    call goes through the proxies), two gateways."""
    ports = {f"worker{i}": free_port() for i in range(2)}
    proxies = {name: CrashOnPoisonProxyFaultInjection(port) for name, port in ports.items()}
    c = start_live(
        tmp_path_factory.mktemp("poison"),
        workers=0,
        gateways=0,
        registry_env={"FOVEA_REGISTRY_HEARTBEAT_TTL_S": HEARTBEAT_TTL_S},
    )
    pc = PoisonCluster(c, proxies)
    try:
        for name in ports:
            c.workers.append(pc.start_worker(name))
        wait_ready(c, 2)
        for i in range(2):
            c.gateways.append(start_gateway(c, f"gateway{i}"))
        pc.track_pids()
        yield pc
    finally:
        quick_stop(c)
        for p in proxies.values():
            p.stop()


async def wait_every_gateway_reaches_every_worker(pc: PoisonCluster, key: str, timeout_s: float = 30.0) -> None:
    """Until each gateway has sent a call through each worker's proxy. A run of successes does not show it: a
    call that cannot reach one worker (its gateway's connection to it still waits to dial again) is retried on
    the other, and the drill needs both reachable before one dies."""
    live, deadline = pc.live, time.monotonic() + timeout_s
    markers = [f"reach-gateway{i}".encode() for i in range(len(live.gateways))]
    for p in pc.proxies.values():
        p.watch, p.seen = tuple(markers), set()
    load = Load(live, key)
    for gateway, marker in zip(live.gateways, markers, strict=True):
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not all(marker in p.seen for p in pc.proxies.values()):
                assert time.monotonic() < deadline, f"{marker.decode()} did not reach every worker in {timeout_s} s"
                await load.call(stub, marker.decode(), 1.0)
                await asyncio.sleep(0.01)


@pytest.mark.parametrize("path", ["native", "relayed"])
async def test_poison_call_costs_one_worker(poison_cluster: PoisonCluster, path: str) -> None:
    """A call that kills the worker it reaches (under load): it gets UNAVAILABLE and is not retried, so exactly
    one worker dies; other calls fail only if they were in flight on that worker; the other worker serves on.
    The poison call's key decides who routes it: the gateway's native front (no rate limits, on gateway0), or
    the Python server behind it (a limit never reached, on gateway1)."""
    pc = poison_cluster
    live = pc.live
    await asyncio.to_thread(pc.restart_dead)
    await asyncio.to_thread(wait_ready, live, 2)
    pc.track_pids()
    key = live.keys["infer"]
    await wait_all_ports_ok(live, key, streak=20)
    await wait_every_gateway_reaches_every_worker(pc, key)
    kills_before = sum(p.kills for p in pc.proxies.values())
    address = live.gateways[0 if path == "native" else 1].address
    poison_key = key if path == "native" else live.rc.create_key("infer", rate_limit_rps=10_000.0)[1]
    poison: dict[str, tuple[str, str]] = {}

    def send_poison() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req = ident_request("poison-" + POISON.decode(), 1.0)
            try:
                stub.ModelInfer(req, metadata=(("authorization", f"Bearer {poison_key}"),), timeout=DEADLINE_S)
                poison["answer"] = ("OK", "")
            except grpc.RpcError as exc:
                poison["answer"] = (exc.code().name, exc.details() or "")

    ledger, fault_at = await run_load(live, key, send_poison, after_s=3.0)
    ledger.check_accounting()
    dead = [w.name for w in live.workers if w.proc.poll() is not None]
    failures = ledger.failures()
    report(
        f"poison call, {path} path",
        ledger,
        first_ok=ledger.first_ok_after(fault_at),
        last_failure_ends=max((a.done_at - fault_at for a in failures), default=0.0),
    )
    print(f"[drill] poison answer: {poison.get('answer')}; dead workers: {dead}")
    assert poison["answer"][0] == "UNAVAILABLE", poison
    assert sum(p.kills for p in pc.proxies.values()) - kills_before == 1 and len(dead) == 1, dead
    assert all(a.status == "UNAVAILABLE" and a.sent_at < fault_at + 0.5 for a in failures), listing(failures, fault_at)
    assert len(failures) <= 2 * len(Load(live, key).ports), listing(failures, fault_at)
