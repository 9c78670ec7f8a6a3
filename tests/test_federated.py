"""`implicitlayers.federated`: the fusion rule, the Flower strategy and ClientApp, and real Flower runs.

- The fusion rule on hand-computed cases and as a convex combination (Hypothesis); Flower-free.
- The strategy and the ClientApp called directly on Flower messages (no Ray, no subprocess).
- One real simulation (the example's `--fast` mode: Ray, 3 clients, 2 rounds, two runs).
- One real deployment: a SuperLink and two SuperNodes as separate processes on 127.0.0.1, and
  `flwr run`, bounded in time; every process is stopped in a `finally`.

Everything that needs Flower skips when the `federated` extra is missing (Flower ends the whole
process, not just the test, when its simulation starts without Ray).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implicitlayers.federated import quality_weights, weighted_average

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAS_FLOWER = importlib.util.find_spec("flwr") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_flower = pytest.mark.skipif(not HAS_FLOWER, reason='needs the extra: pip install "implicitlayers[federated]"')
needs_ray = pytest.mark.skipif(not (HAS_FLOWER and HAS_RAY), reason='needs the extra: pip install "implicitlayers[federated]"')


# --- the fusion rule (no Flower) -------------------------------------------------------------------


def test_quality_weights_are_examples_times_quality_normalised() -> None:
    # n = (100, 100, 200), q = (0.9, 0.6, 0.75): n·q = (90, 60, 150), total 300.
    assert quality_weights([100, 100, 200], [0.9, 0.6, 0.75]) == pytest.approx([0.3, 0.2, 0.5])


def test_quality_weights_lower_is_better_inverts_the_quality() -> None:
    # Residuals 0.1 and 0.4 with equal n: weights ∝ 10 and 2.5, i.e. 0.8 and 0.2.
    assert quality_weights([50, 50], [0.1, 0.4], lower_is_better=True, eps=1e-12) == pytest.approx([0.8, 0.2])


def test_quality_weights_with_equal_qualities_are_fedavg() -> None:
    assert quality_weights([10, 30, 60], [0.7, 0.7, 0.7]) == pytest.approx([0.1, 0.3, 0.6])


def test_quality_weights_fall_back_to_fedavg_when_every_quality_is_zero() -> None:
    assert quality_weights([1, 3], [0.0, 0.0]) == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize(
    "num_examples, quality, match",
    [
        ([1, 2], [0.5], "one quality per client"),
        ([], [], "at least one client"),
        ([1, -2], [0.5, 0.5], r"num_examples\[1\]"),
        ([1, 2], [0.5, float("nan")], r"quality\[1\]"),
        ([0, 0], [0.5, 0.5], "0 examples"),
    ],
)
def test_quality_weights_reject_bad_input(num_examples, quality, match) -> None:
    with pytest.raises(ValueError, match=match):
        quality_weights(num_examples, quality)


def test_weighted_average_hand_computed_keeps_dtypes_and_integer_buffers() -> None:
    a = {
        "w": torch.tensor([1.0, 2.0]),
        "h": torch.tensor([1.0], dtype=torch.float16),
        "d": torch.tensor([0.0], dtype=torch.float64),
        "steps": torch.tensor(3),
        "mask": torch.tensor([True, False]),
    }
    b = {
        "w": torch.tensor([3.0, 6.0]),
        "h": torch.tensor([2.0], dtype=torch.float16),
        "d": torch.tensor([1.0], dtype=torch.float64),
        "steps": torch.tensor(5),
        "mask": torch.tensor([False, True]),
    }
    fused = weighted_average([a, b], [0.25, 0.75])
    assert list(fused) == list(a)
    assert {k: v.dtype for k, v in fused.items()} == {k: v.dtype for k, v in a.items()}
    torch.testing.assert_close(fused["w"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(fused["h"], torch.tensor([1.75], dtype=torch.float16))
    torch.testing.assert_close(fused["d"], torch.tensor([0.75], dtype=torch.float64))
    assert int(fused["steps"]) == 5 and fused["mask"].tolist() == [False, True]  # b weighs more
    assert weighted_average([a, b], [0.5, 0.5])["steps"] == 3  # a tie goes to the first client


def test_weighted_average_does_not_alias_its_inputs() -> None:
    a = {"w": torch.ones(2), "n": torch.tensor(1)}
    fused = weighted_average([a], [1.0])
    fused["w"].add_(1.0)
    fused["n"].add_(1)
    assert a["w"].tolist() == [1.0, 1.0] and int(a["n"]) == 1


@pytest.mark.parametrize(
    "other, match",
    [
        ({"v": torch.zeros(2)}, "different keys"),
        ({"w": torch.zeros(3)}, "entry 'w'"),
        ({"w": torch.zeros(2, dtype=torch.float64)}, "entry 'w'"),
    ],
)
def test_weighted_average_rejects_mismatched_state_dicts(other, match) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average([{"w": torch.zeros(2)}, other], [0.5, 0.5])


@given(
    values=st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=5),
    raw=st.lists(st.floats(0.01, 10.0), min_size=5, max_size=5),
)
def test_weighted_average_is_a_convex_combination(values, raw) -> None:
    weights = [r / sum(raw[: len(values)]) for r in raw[: len(values)]]
    states = [{"w": torch.tensor(v, dtype=torch.float64)} for v in values]
    fused = weighted_average(states, weights)["w"]
    stacked = torch.stack([s["w"] for s in states])
    assert torch.all(fused >= stacked.min(0).values - 1e-9) and torch.all(fused <= stacked.max(0).values + 1e-9)
    expected = sum(w * s["w"] for w, s in zip(weights, states))
    torch.testing.assert_close(fused, expected)


# --- the strategy and the ClientApp on Flower messages (no Ray) ------------------------------------


@pytest.fixture
def flower_task(monkeypatch):
    """Flower's messages read the running task's identity from a process global, which the engines
    set; tests that build messages by hand set it and restore it."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _instruction(content, message_type: str, node: int = 7):
    from flwr.app import Message

    msg = Message(content=content, dst_node_id=node, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"m{node}"  # the SuperLink would set it
    return msg


def _reply(state: dict, metrics: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    request = _instruction(RecordDict({"config": ConfigRecord({"server-round": 1})}), "train")
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=request)


@needs_flower
def test_strategy_fuses_by_quality_and_keeps_integer_buffers(flower_task) -> None:
    from implicitlayers.federated import QualityWeightedFedAvg

    replies = [
        _reply({"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}, {"num-examples": 100, "val-accuracy": 0.9, "loss": 1.0}),
        _reply({"w": torch.tensor([4.0, 8.0]), "steps": torch.tensor(9)}, {"num-examples": 300, "val-accuracy": 0.1, "loss": 3.0}),
    ]
    strategy = QualityWeightedFedAvg()
    arrays, metrics = strategy.aggregate_train(1, replies)
    # weights ∝ (100·0.9, 300·0.1) = (90, 30): (0.75, 0.25), whereas FedAvg would use (0.25, 0.75).
    state = arrays.to_torch_state_dict()
    torch.testing.assert_close(state["w"], torch.tensor([1.75, 3.5]))
    assert state["w"].dtype == torch.float32 and state["steps"].dtype == torch.int64 and int(state["steps"]) == 3
    assert [c["weight"] for c in strategy.fusion_log[1]] == pytest.approx([0.75, 0.25])
    assert metrics["loss"] == pytest.approx(0.25 * 1.0 + 0.75 * 3.0)  # metrics stay weighted by n alone


@needs_flower
def test_strategy_with_residual_quality_favours_the_converged_client(flower_task) -> None:
    from implicitlayers.federated import QualityWeightedFedAvg

    replies = [
        _reply({"w": torch.tensor([0.0])}, {"num-examples": 10, "residual": 0.3}),
        _reply({"w": torch.tensor([1.0])}, {"num-examples": 10, "residual": 0.1}),
    ]
    arrays, _ = QualityWeightedFedAvg(quality_key="residual", lower_is_better=True, eps=1e-12).aggregate_train(1, replies)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.tensor([0.75]))  # ∝ (1/0.3, 1/0.1)


@needs_flower
def test_strategy_names_a_missing_quality_metric(flower_task) -> None:
    from flwr.serverapp.exception import InconsistentMessageReplies

    from implicitlayers.federated import QualityWeightedFedAvg

    replies = [_reply({"w": torch.zeros(1)}, {"num-examples": 1}), _reply({"w": torch.ones(1)}, {"num-examples": 1})]
    with pytest.raises(InconsistentMessageReplies, match="val-accuracy"):
        QualityWeightedFedAvg().aggregate_train(1, replies)


def _deq_model(hidden: int = 8) -> torch.nn.Module:
    from implicitlayers.federated.digits import DigitsDEQ

    torch.manual_seed(0)
    return DigitsDEQ(hidden)


@needs_flower
def test_set_fixed_point_budget_caps_every_deq_and_silences_the_cap() -> None:
    from implicitlayers.federated import set_fixed_point_budget

    model = torch.nn.Sequential(_deq_model(), torch.nn.Identity())
    old_solver = model[0].deq.solver
    assert set_fixed_point_budget(model, 3) == 1
    assert model[0].deq.solver == old_solver.replace(max_iter=3, on_failure="ignore")
    assert old_solver.max_iter == 30  # configs are immutable: the old one is untouched
    model(torch.rand(5, 64))
    assert int(model[0].deq.last_info.nstep.max()) <= 3
    assert set_fixed_point_budget(torch.nn.Linear(2, 2), 3) == 0
    with pytest.raises(ValueError, match="integer >= 1"):
        set_fixed_point_budget(model, 0)


@needs_flower
def test_fixed_point_budget_prefers_the_node_config() -> None:
    from flwr.app import Context, RecordDict

    from implicitlayers.federated import fixed_point_budget

    def context(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    assert fixed_point_budget(context({"partition-id": 1, "fp-budget": 7}), budgets=[2, 4]) == 7
    assert fixed_point_budget(context({"partition-id": 1}), budgets=[2, 4]) == 4
    assert fixed_point_budget(context({"partition-id": 1})) is None
    with pytest.raises(IndexError, match="partition 2"):
        fixed_point_budget(context({"partition-id": 2}), budgets=[2, 4])


@needs_flower
def test_client_app_trains_under_its_budget_and_reports_flower_bytes(flower_task) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from implicitlayers.federated import make_deq_client_app
    from implicitlayers.federated.digits import DigitsPartitions

    app = make_deq_client_app(lambda: _deq_model(), DigitsPartitions(alpha=None, seed=0), budgets=[2, 5], batch_size=64)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config={})
    initial = ArrayRecord(_deq_model().state_dict())
    content = RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": 1})})
    reply = app(_instruction(content, "train"), context)
    metrics = reply.content.metric_records["metrics"]
    arrays = reply.content.array_records["arrays"]
    assert metrics["fp-budget"] == 2 and metrics["num-examples"] == 288  # 360 of 1,437, 72 (20 %) kept for validation
    assert metrics["upload-bytes"] == arrays.count_bytes() and 0.0 <= metrics["val-accuracy"] <= 1.0
    assert metrics["residual"] > 1e-4  # two iterations do not reach the tolerance: the cap was applied
    trained = arrays.to_torch_state_dict()
    assert not torch.equal(trained["deq.cell.linear.weight"], initial.to_torch_state_dict()["deq.cell.linear.weight"])
    evaluation = app(_instruction(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), "evaluate"), context)
    assert set(evaluation.content.metric_records["metrics"]) == {"num-examples", "eval-loss", "eval-accuracy", "residual"}


# --- real Flower runs --------------------------------------------------------------------------------


@needs_flower
def test_run_federated_refuses_a_strategy_that_would_wait_forever() -> None:
    from flwr.serverapp.strategy import FedAvg

    from implicitlayers.federated import make_deq_client_app, run_federated
    from implicitlayers.federated.digits import DigitsPartitions

    app = make_deq_client_app(_deq_model, DigitsPartitions())
    with pytest.raises(ValueError, match="wait forever"):
        run_federated(FedAvg(min_available_nodes=5), app, _deq_model, num_clients=3, num_rounds=1)


@needs_flower
def test_run_federated_without_ray_raises_instead_of_ending_the_process(monkeypatch) -> None:
    from flwr.serverapp.strategy import FedAvg

    from implicitlayers.federated import make_deq_client_app, run_federated
    from implicitlayers.federated.digits import DigitsPartitions

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"implicitlayers\[federated\]"):
        run_federated(FedAvg(), make_deq_client_app(_deq_model, DigitsPartitions()), _deq_model, num_clients=2, num_rounds=1)


@pytest.fixture
def short_tmp():
    """A short temporary folder: Ray's socket paths under it must stay within 107 bytes (AF_UNIX)."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# Ray drops the Popen objects and /dev/null handles of processes it has already stopped; Python
# reports them when they are garbage collected (the test then checks that no process is left).
@pytest.mark.filterwarnings(r"ignore:Exception ignored in. <_io.FileIO name='/dev/null':pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings(r"ignore:Exception ignored in. <function Popen.__del__:pytest.PytestUnraisableExceptionWarning")
@needs_ray
def test_example_fast_mode_is_a_real_simulation(tmp_path, short_tmp, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_TMPDIR", short_tmp)
    spec = importlib.util.spec_from_file_location("federated_deq", ROOT / "examples" / "federated_deq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A short round timeout bounds the wait of Flower's server thread should Ray fail to start.
    out = module.main(["--fast", "--out", str(tmp_path), "--round-timeout", "120"])
    deq, untied = out["runs"]
    assert (deq["model"], deq["fusion"], untied["model"], untied["fusion"]) == ("deq", "quality", "untied", "fedavg")
    for run in (deq, untied):
        assert len(run["test_accuracy"]) == 3  # before training, after round 1, after round 2
        assert run["test_accuracy"][-1] > run["test_accuracy"][0] + 0.1  # training through Flower helps
    for log in deq["fusion_log"].values():  # the strategy weighed the clients by n·(validation accuracy)
        assert sorted(int(c["fp-budget"]) for c in log) == [2, 11, 20]
        expected = quality_weights([c["num-examples"] for c in log], [c["val-accuracy"] for c in log])
        assert [c["weight"] for c in log] == pytest.approx(expected)
    # The untied net (3 layers here) has more parameters, and Flower counts more bytes for it.
    assert untied["num_parameters"] > deq["num_parameters"]
    assert untied["upload_bytes_per_round"] > deq["upload_bytes_per_round"]
    assert out["accuracy"].exists() and out["weights"].exists()
    gc.collect()  # Ray's leftovers are reported here, under this test's filters
    deadline = time.monotonic() + 10
    while _processes_with(f"RAY_TMPDIR={short_tmp}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(f"RAY_TMPDIR={short_tmp}") == [], "a Ray process outlived the simulation"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, processes, deadline: float, what: str) -> None:
    while not predicate():
        for proc in processes:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: {proc.args[0]} exited with {proc.returncode} while waiting")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return opener.open(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
    except OSError:
        return False


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment holds `marker` (our private FLWR_HOME): the detached SuperExecs and apps too."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop(processes: list[subprocess.Popen], marker: str) -> None:
    for proc in processes:  # SuperNodes first (they unregister), the SuperLink last
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    deadline = time.monotonic() + 3
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process sweep reads /proc")
@needs_flower
def test_deployment_engine_runs_the_app_on_localhost_processes(tmp_path) -> None:
    """A SuperLink, two SuperNodes (budgets 2 and 8) and `flwr run` of `examples/federated_app`, 1 round."""
    scripts = pathlib.Path(sysconfig.get_path("scripts"))
    home = tmp_path / "flwr-home"
    home.mkdir()
    marker = f"FLWR_HOME={home}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(
        FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        UV_CACHE_DIR=str(tmp_path / "uv"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
    )
    link_port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    results = tmp_path / "results.json"
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen(
            [str(scripts / args[0]), *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()  # the child holds its own descriptor
        processes.insert(0, proc)  # stopped in reverse start order
        return proc

    try:
        link = start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                     "--disable-runtime-dependency-installation")
        _wait_for(lambda: _healthy(link_port), [link], time.monotonic() + 60, "the SuperLink's /health")
        for i, budget in enumerate((2, 8)):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--host", "127.0.0.1", "--port", str(_free_port()), "--max-wait-time", "60",
                  "--node-config", f"partition-id={i} num-partitions=2 fp-budget={budget}")
        run = subprocess.run(
            [str(scripts / "flwr"), "run", str(ROOT / "examples" / "federated_app"), "dep", "--stream",
             "--run-config", f'num-server-rounds=1 fraction-evaluate=0.0 results-path="{results}"'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
        )
        # `flwr run --stream` can return before the run ends (its log stream may close early under
        # load), so wait for the ServerApp's own output, still bounded in time.
        deadline = time.monotonic() + 120
        while not results.exists() and time.monotonic() < deadline and all(p.poll() is None for p in processes):
            time.sleep(0.2)
        if not results.exists():
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
            raise AssertionError(f"no results; flwr run said:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{logs}")
        summary = json.loads(results.read_text())
        assert set(summary["test-accuracy"]) == {"0", "1"}
        log = summary["fusion-log"]["1"]
        assert sorted(int(c["fp-budget"]) for c in log) == [2, 8]  # each SuperNode's own node config
        assert sum(c["weight"] for c in log) == pytest.approx(1.0)
        assert summary["test-accuracy"]["1"] > summary["test-accuracy"]["0"]
    finally:
        _stop(processes, marker)
    assert _processes_with(marker) == [], "a Flower process outlived the test"
