"""Shared fixtures: a real SQLite MLflow store per test, and a way to run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Small but real: the tiny Falcon, two prompts, a few forced tokens.
# noise.reruns=0: tests of other things do not spend time running a busy machine's generations again
# (tests/test_noise.py does, with its own setting); the noise is still found, said and tagged.
QUICK = ["model=tiny-falcon", "max_length=null", "max_new_tokens=6", "repetitions=2", "warmup=1", "quality.enabled=false", "noise.reruns=0"]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, created (all of MLflow's migrations run) once per session."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> str:
    """A test's own SQLite store (a copy of the empty one: creating a store is not what most tests
    test; tests/test_reliability.py creates one from nothing with two sweeps at once)."""
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


TWO_PROMPTS = "- Name three colours.\n- What is an A/B test?\n"


@pytest.fixture
def two_prompts(tmp_path) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_PROMPTS)
    return path


@dataclass(frozen=True)
class Sweep:
    uri: str
    root: Path
    done: subprocess.CompletedProcess


TINY_SWEEP = ("max_length=24,32", "bits=4,8,16")  # max_length first: jobs still run grouped by weights


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Sweep:
    """One real sweep that many tests only read: the tiny Falcon in 4, 8 and 16 bits at two
    max_lengths, two prompts, two repetitions, one warm-up, quality on, its own store and cache."""
    root = tmp_path_factory.mktemp("tiny-sweep")
    (root / "two.yaml").write_text(TWO_PROMPTS)
    uri = f"sqlite:///{root}/mlflow.db"
    done = run_cli("-m", *TINY_SWEEP, "model=tiny-falcon", "repetitions=2", "warmup=1", f"prompts.file={root / 'two.yaml'}",
                   cwd=root, env={"MLFLOW_TRACKING_URI": uri, "FALCON_EXP_CACHE": str(root / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    return Sweep(uri, root, done)


def run_cli(*args: str, cwd: Path, env: dict | None = None, module: str = "falcon_exp", timeout: int = 900,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """The real command line (`python -m MODULE ARGS`) in a process of its own, as a user types it.
    By default the process is forked from one that has already imported the command's modules
    (`Forks`), which spares each run the stack's ~6 s of imports; `fresh=True` starts a new
    interpreter, for what happens at import (warnings, what a refusal imports)."""
    environment = os.environ | {"HYDRA_FULL_ERROR": "0"} | (env or {})
    if fresh:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                              timeout=timeout)
    return Forks.shared().run(module, list(args), cwd, environment, timeout)


class Forks:
    """One process that imports what the commands import, then forks a child per command: the
    child takes the command's folder, environment, output files and (if asked) a session of its
    own, and runs the module as `python -m` would (runpy), so each command still runs in a process
    of its own, from the start of its `main`. Requests, children's pids and their exit codes are
    JSON lines on the process's stdin and stdout; several children may run at once."""

    _shared: Forks | None = None
    PRELOAD = ("falcon_exp.app", "falcon_exp.sweep", "falcon_exp.analysis.figures", "transformers.models.falcon.modeling_falcon",
               "transformers.models.llama.modeling_llama", "bitsandbytes", "mlflow", "hydra")
    SERVER = """
import json, os, runpy, select, sys, traceback
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps({"ready": True}), flush=True)
children = set()
while True:
    while children and (done := os.waitpid(-1, os.WNOHANG))[0]:
        children.discard(done[0])
        print(json.dumps({"exited": done[0], "code": os.waitstatus_to_exitcode(done[1])}), flush=True)
    if not select.select([sys.stdin], [], [], 0.05)[0]:
        continue
    line = sys.stdin.readline()
    if not line:
        break
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY), (2, request["err"], os.O_WRONLY)):
                os.dup2(os.open(path, mode), fd)  # first: the caller waits on the stderr pipe's opening
            if request["session"]:
                os.setsid()
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [request["module"], *request["args"]]
            try:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if not isinstance(stop.code, (int, type(None))):
                    print(stop.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children.add(pid)
    print(json.dumps({"pid": pid}), flush=True)
"""

    def __init__(self) -> None:
        import queue
        import threading

        self.process = subprocess.Popen([sys.executable, "-c", self.SERVER, *self.PRELOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=os.environ | {"HYDRA_FULL_ERROR": "0"})
        self.started: queue.Queue = queue.Queue()
        self.exits: dict[int, int] = {}
        self.exited = threading.Condition()
        threading.Thread(target=self._replies, daemon=True).start()
        assert self.started.get(timeout=300) == {"ready": True}

    def _replies(self) -> None:
        for line in self.process.stdout:
            reply = json.loads(line)
            if "exited" not in reply:
                with self.exited:  # a pid the system gave again: not the earlier child's exit
                    self.exits.pop(reply.get("pid"), None)
                self.started.put(reply)
                continue
            with self.exited:
                self.exits[reply["exited"]] = reply["code"]
                self.exited.notify_all()

    @classmethod
    def shared(cls) -> Forks:
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls()
        return cls._shared

    def start(self, module: str, args: list[str], cwd: Path, env: dict, new_session: bool = False) -> Forked:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="forked-"))
        out, err = folder / "out", folder / "err"
        out.touch()
        os.mkfifo(err)  # stderr streams, as a pipe does
        request = {"module": module, "args": args, "cwd": str(cwd), "env": dict(env), "out": str(out), "err": str(err),
                   "session": new_session}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self.started.get(timeout=60)["pid"]
        return Forked(self, pid, [module, *args], folder, open(err, encoding="utf-8", errors="replace"))

    def run(self, module: str, args: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
        child = self.start(module, args, cwd, env)
        out, err = child.communicate(timeout=timeout)
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)


class Forked:
    """A forked command, used as a subprocess.Popen (text mode, stderr a pipe): `stderr` streams
    its lines; `communicate` returns what is left, and stdout."""

    def __init__(self, forks: Forks, pid: int, args: list[str], folder: Path, stderr) -> None:
        self.forks, self.pid, self.args, self.folder, self.stderr = forks, pid, args, folder, stderr
        self.returncode: int | None = None

    def send_signal(self, signal_number: int) -> None:
        if self.poll() is None:  # never a process that took over an ended child's pid
            os.kill(self.pid, signal_number)

    def kill(self) -> None:
        self.send_signal(9)

    def terminate(self) -> None:
        self.send_signal(15)

    def poll(self) -> int | None:
        with self.forks.exited:
            self.returncode = self.forks.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.forks.exited:
            if not self.forks.exited.wait_for(lambda: self.pid in self.forks.exits, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = self.forks.exits[self.pid]
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Reads stderr to its end while waiting (the child never blocks on a full pipe)."""
        import shutil
        import threading

        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.append(self.stderr.read()), daemon=True)
        reader.start()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        reader.join(timeout=60)
        if not reader.is_alive():  # a grandchild may still hold the pipe open: then its text is left
            self.stderr.close()
        out = (self.folder / "out").read_text()
        shutil.rmtree(self.folder, ignore_errors=True)
        return out, "".join(rest)


def start_cli(*args: str, cwd: Path, env: dict | None = None, new_session: bool = False) -> Forked:
    """The command line started and left running (as subprocess.Popen), forked as run_cli's are."""
    environment = os.environ | {"HYDRA_FULL_ERROR": "0"} | (env or {})
    return Forks.shared().start("falcon_exp", list(args), cwd, environment, new_session)


def start_mlflow_server(root: Path, port: int | None = None, backend: str | None = None):
    """A real `mlflow server` on loopback with a SQLite backend in `root` (or the `backend` store
    given), serving the artifacts in `root/artifacts`; returns (process, uri)."""
    import socket
    import time
    import urllib.request

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend or f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT,
        # MLflow's job runner (seven huey consumers, ~260 MB each) serves GenAI jobs no test asks for
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            return process, uri
        except OSError:
            assert process.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(0.2)
    process.kill()
    raise AssertionError("mlflow server did not answer within 120 s")


def runs_of(uri: str, experiment: str = "falcon-exp"):
    """All runs of an experiment, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {uri}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time), client


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only mount (a bind mount of an empty folder; root's permissions would
    let it write through mode bits). Skipped where this process may not mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount a read-only folder here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A small file system of its own (tmpfs), and a way to fill it up to `left` KiB."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def fill(left_kib: int) -> None:
        stat = os.statvfs(folder)
        with open(folder / "filler", "ab") as filler:
            filler.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - left_kib * 1024))

    yield folder, fill
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # the test's own MLflow client may still hold the store open


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node SLURM cluster for the session: its environment (SLURM_CONF). Skipped, with
    the reason, where Debian's slurm-wlm and munge are absent, unless FALCON_EXP_REQUIRE_CLUSTER
    is set (CI sets it and installs them)."""
    import cluster

    if (why := cluster.missing()) is not None:
        if os.environ.get("FALCON_EXP_REQUIRE_CLUSTER"):
            pytest.fail(f"FALCON_EXP_REQUIRE_CLUSTER is set but {why}")
        pytest.skip(f"no SLURM cluster here: {why}")
    root = tmp_path_factory.mktemp("slurm")
    env = cluster.start(root)
    yield env
    cluster.stop(root)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session, with an empty database for MLflow: its store URI.
    Skipped, with the reason, where Debian's postgresql is absent, unless FALCON_EXP_REQUIRE_POSTGRES
    is set (CI sets it and installs it)."""
    import postgres as server

    if (why := server.missing()) is not None:
        if os.environ.get("FALCON_EXP_REQUIRE_POSTGRES"):
            pytest.fail(f"FALCON_EXP_REQUIRE_POSTGRES is set but {why}")
        pytest.skip(f"no PostgreSQL here: {why}")
    root, uri = server.start()
    yield uri
    server.stop(root)


@pytest.fixture(scope="session")
def pg_server(postgres, tmp_path_factory):
    """`mlflow server` on the PostgreSQL store with a shared artifact folder, for the session:
    (uri, folder). Tests that share it tell their runs apart by experiment."""
    root = tmp_path_factory.mktemp("pg-server")
    process, uri = start_mlflow_server(root, backend=postgres)
    yield uri, root
    process.terminate()
    process.wait(timeout=30)


def compose(*overrides: str):
    """A JobConfig composed by Hydra from the packaged config, as the command line would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from falcon_exp.config import CONF_DIR, JobConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return JobConfig.from_hydra(hydra_compose("config", overrides=list(overrides)))


def load_config(config, device: str = "cpu"):
    """The quantization_config transformers loads a job's model with (None unquantized)."""
    return None if config.bits == 16 else config.quantization.method.load_config(config, device)


def resolve_job(*overrides: str):
    """A resolved Job (weights found, prompts tokenised), as a job starts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from falcon_exp.config import CONF_DIR
    from falcon_exp.job import resolve

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return resolve(hydra_compose("config", overrides=list(overrides)))


def save_tiny_falcon(path: Path, seed: int = 0, quantization: tuple[str, ...] = (), eos_token_id: int | None = None) -> Path:
    """A local tiny-Falcon checkpoint directory as users have them: weights (bf16, or quantized by
    bitsandbytes as the `quantization` overrides ask, e.g. ("bits=4",)), config, tokenizer."""
    import shutil

    import torch
    from transformers.models.falcon.modeling_falcon import FalconForCausalLM

    from falcon_exp.quantization import quantizable_linears
    from falcon_exp.weights import architecture_config, synthetic_state_dict, synthetic_tokenizer_dir

    config = architecture_config("tiny-falcon")
    state = synthetic_state_dict(config, seed, torch.bfloat16, True)
    with quantizable_linears():
        model = FalconForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch.bfloat16, device_map="cpu",
                                                  quantization_config=load_config(compose(*quantization)) if quantization else None)
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(synthetic_tokenizer_dir() / name, path / name)
    return path
