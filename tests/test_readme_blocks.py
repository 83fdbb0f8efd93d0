"""Every shell block of README.md runs as printed, so an example that stops working fails here.

Shrunk only as the README itself says: its "smoke" block lists the overrides that make a command a seconds-long run
(``smoke run`` for train, evaluate, tune and ablate on the synthetic pair, as ``stages.*.<key>`` for a chain;
``smoke tune`` and ``smoke ablate`` also for tune and ablate), and they are appended to each such command. Folder
names with a time stamp (``results/demo-20261122-115304``) and a checkpoint's iteration stand for what the test's own
runs wrote. The commands run in the README's order in one working folder, so they chain as a reader's do (tune →
analyze → retrain on the same experiment), through ``uda_ray.cli.main`` in this process and one local Ray.

What needs what CI lacks is checked as far as it can be, each with the reason: a command on GTA5/SYNTHIA/Cityscapes
(or with a pretrained or released file, or a cluster address) runs with ``--check``, which validates the config,
the space and every trial's config and must then stop at nothing but the missing data or files; TensorBoard and
optuna-dashboard (servers) must be installed and find what they would show; Ray's own cluster commands and the
install lines are named as skipped.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.ray

README = ROOT / "README.md"
STAMP = re.compile(r"results/([A-Za-z_][\w.]*?)-(?:\d{8}-\d{6}|<time>)")
MISSING_INPUTS = ("data.source_root", "data.target_root", "model.pretrained_path", "model.init_from")
RAY_CLUSTER = ("ray up", "ray down", "ray dashboard", "ray job submit", "ray start", "pip wheel")


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block."""
    return re.findall(r"```(\w*)\n(.*?)```", text, re.S)


def smoke_overrides(text: str) -> dict[str, list[str]]:
    """The README's smoke block: ``{"run": [...], "tune": [...], "ablate": [...]}``."""
    block = next(body for lang, body in readme_blocks(text) if lang == "text" and body.startswith("smoke run:"))
    out = {}
    for line in block.splitlines():
        name, _, rest = line.partition(":")
        out[name.removeprefix("smoke ").strip()] = shlex.split(rest)
    assert set(out) == {"run", "tune", "ablate"}, out
    return out


def shell_commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped, ``a && b`` split."""
    joined = body.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        parts: list[list[str]] = [[]]
        for word in shlex.split(line, comments=True):
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(word)
        out += [shlex.join(p) for p in parts if p]
    return out


@dataclass
class Outcome:
    command: str
    action: str  # "ran", "checked", "skipped"
    detail: str
    seconds: float


class Reader:
    """Runs the README's commands in ``work`` as a reader would, with the smoke overrides appended."""

    def __init__(self, work: Path, smoke: dict[str, list[str]]) -> None:
        self.work, self.smoke = work, smoke
        self.outcomes: list[Outcome] = []

    # ------------------------------------------------------------------------------------------------ placeholders
    def resolve(self, word: str) -> str | None:
        """A README path with its placeholders filled in from what the earlier commands wrote (None: unknowable)."""
        if any(p in word for p in ("<experiment>", "<run>", "work_dirs/", "s3://")) or word == "FILE":
            return None
        if word == "KEY":  # `uda-ray stages results --remove KEY`: a key the listing before it shows
            from uda_ray.stages.cache import StageCache, stages_root
            from uda_ray.tune.driver import storage_root

            entries = StageCache(stages_root(storage_root("results"))).entries()
            assert entries, "README removes a cached stage, but no earlier command cached one"
            return next((e for e in entries if e["name"] == "labels"), entries[0])["key"]
        m = STAMP.search(word)
        if m:
            name = m.group(1)
            found = sorted(p.name for p in (self.work / "results").glob(f"{name}-*")
                           if re.fullmatch(rf"{re.escape(name)}-\d{{8}}-\d{{6}}(-\d+)?", p.name))
            assert found, f"README names results/{name}-<time> but no earlier command wrote one"
            word = word[:m.start()] + f"results/{found[-1]}" + word[m.end():]
        m = re.search(r"(.*/checkpoints)/iter_\d{7}", word)
        if m:
            ckpts = sorted((self.work / m.group(1)).glob("iter_*"))
            assert ckpts, f"README names {word} but the run wrote no checkpoint"
            word = word.replace(m.group(0), f"{m.group(1)}/{ckpts[-1].name}")
        return word

    # ------------------------------------------------------------------------------------------------ kinds
    def chain(self, path: str) -> bool:
        from uda_ray.stages import is_chain_file
        from uda_ray.tune.spec_yaml import read_yaml

        file = self.work / path
        if is_chain_file(file):
            return True
        data = read_yaml(file) if file.suffix in (".yaml", ".yml") else {}
        base = data.get("base", {}).get("config") if isinstance(data.get("base"), dict) else None
        return base is not None and is_chain_file(file.parent / base)

    def on_synthetic(self, sub: str, args: list[str]) -> bool:
        """Whether the command's runs train on the built-in synthetic pair (nothing to download)."""
        from uda_ray.stages import load_run
        from uda_ray.stages.chain import final_config
        from uda_ray.tune.spec_yaml import read_yaml

        path = self.work / args[0]
        if sub in ("tune", "ablate"):
            base = read_yaml(path)["base"]
            path = path.parent / base["config"]
        cfg = final_config(load_run(path))
        return cfg.data.source == cfg.data.target == "synthetic" and not cfg.model.pretrained_path

    # ------------------------------------------------------------------------------------------------ running
    def main(self, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        from uda_ray.cli import main

        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            for k, v in env.items():
                mp.setenv(k, v)
            code = main(argv)
        return code, out.getvalue(), err.getvalue()

    def run(self, command: str) -> None:
        start = time.monotonic()
        if command.startswith("uda-ray ") and any(o.command == command for o in self.outcomes):
            action, detail = "skipped", "the same command ran above"
        else:
            action, detail = self._run(command)
        self.outcomes.append(Outcome(command, action, detail, time.monotonic() - start))

    def _run(self, command: str) -> tuple[str, str]:
        words = shlex.split(command)
        env = {}
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        if words[:2] == ["python3", "-m"] or words[0] in (".", "pip") and words[:2] != ["pip", "wheel"]:
            return "skipped", "installation: the test runs in the environment CI installed as README says"
        if words[0] == "pytest":
            return "skipped", "the test suite itself"
        if any(command.startswith(c) for c in RAY_CLUSTER):
            if "uda-ray" in words:  # ray job submit ... -- uda-ray ...: the command a cluster would run
                return self._run(shlex.join(words[words.index("uda-ray"):]))
            return "skipped", "a cluster's setup (wheel, launcher, its own Ray): no cluster or second Ray here"
        if words[0] == "tensorboard":
            logdir = self.resolve(words[words.index("--logdir") + 1])
            assert shutil.which("tensorboard"), "tensorboard is not installed by the main install"
            assert list((self.work / logdir).rglob("events.out.tfevents*")), f"{logdir}: no TensorBoard events"
            return "checked", "a server: installed, and the experiment holds TensorBoard event files"
        if words[0] == "optuna-dashboard":
            from optuna_dashboard._storage_url import guess_storage_from_url

            where = self.resolve(words[1])
            assert shutil.which("optuna-dashboard"), "optuna-dashboard is not installed"
            # the storage the dashboard itself would open from that argument
            storage = guess_storage_from_url(where.replace("sqlite:///", f"sqlite:///{self.work}/") if
                                             where.startswith("sqlite:///") else str(self.work / where))
            summaries = storage.get_all_studies()
            assert summaries and storage.get_n_trials(summaries[0]._study_id) > 0, where
            return "checked", "a server: installed, and the study it would show has trials"
        assert words[0] == "uda-ray", f"README command {command!r}: the test does not know how to run it"
        return self._uda_ray(words[1:], env)

    def _uda_ray(self, words: list[str], env: dict[str, str]) -> tuple[str, str]:
        sub, args = words[0], words[1:]
        resolved = [self.resolve(a) for a in args]
        if None in resolved:
            gone = args[resolved.index(None)]
            return "skipped", f"{gone!r} names a file, bucket or cluster folder that only the reader has"
        args = resolved
        if sub in ("train", "tune", "ablate", "evaluate"):
            needs_more = "--address" in args or (sub != "evaluate" and not self.on_synthetic(sub, args))
            if needs_more:  # data, pretrained files or a cluster this machine lacks: validated as far as it goes
                code, out, err = self.main([sub, *args, "--check"], env)
                lines = err.strip().splitlines()
                problems = [ln.strip().removeprefix("- ") for ln in (lines[1:] if "problems" in err else lines)]
                problems = [p.removeprefix("uda-ray: ") for p in problems]
                assert code == 0 or (code == 2 and problems and all(p.startswith(MISSING_INPUTS) for p in problems)), \
                    f"uda-ray {sub} {shlex.join(args)} --check: exit {code}\n{out}\n{err}"
                return "checked", ("--check: valid" if code == 0 else
                                   "--check: valid up to the missing " + ", ".join(p.split(" ")[0] for p in problems))
            smoke = list(self.smoke["run"])
            if sub != "evaluate" and self.chain(args[0]):
                smoke = [f"stages.*.{o}" for o in smoke]
            smoke += self.smoke.get(sub, [])
            args = [*args, *smoke]
        code, out, err = self.main([sub, *args], env)
        assert code == 0, f"uda-ray {sub} {shlex.join(args)}: exit {code}\n{out[-3000:]}\n{err[-3000:]}"
        return "ran", f"exit 0, {len(out.splitlines())} lines"

    def python(self, body: str) -> None:
        start = time.monotonic()
        code = STAMP.sub(lambda m: self.resolve(m.group(0)), body)
        exec(compile(code, "README.md (python block)", "exec"), {})  # noqa: S102 - the README's own example
        self.outcomes.append(Outcome("python block", "ran", "", time.monotonic() - start))


@pytest.fixture()
def reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Reader:
    """A working folder with the repository's search spaces, its own home (caches, Ray's token, local-Ray records)
    and, at the end, no Ray left running."""
    import ray

    work = tmp_path / "work"
    work.mkdir()
    (work / "search_spaces").symlink_to(ROOT / "search_spaces")
    monkeypatch.chdir(work)
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():  # an earlier Ray of this process turned token authentication on: its Rays keep that token
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UDA_RAY_LOCAL_RAY_RECORDS", str(tmp_path / "records"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield Reader(work, smoke_overrides(README.read_text()))
    ray.shutdown()


def test_every_readme_block_runs(reader: Reader, capsys: pytest.CaptureFixture) -> None:
    start = time.monotonic()
    try:
        for lang, body in readme_blocks(README.read_text()):
            if lang == "bash":
                for command in shell_commands(body):
                    reader.run(command)
            elif lang == "python":
                reader.python(body)
    finally:
        with capsys.disabled():
            print(f"\nREADME blocks ({time.monotonic() - start:.0f} s):")
            for o in reader.outcomes:
                print(f"  {o.seconds:5.1f} s  {o.action:<8} {o.command[:90]}  [{o.detail}]")
    ran = [o.command for o in reader.outcomes if o.action == "ran"]
    assert any(c.startswith("uda-ray tune search_spaces/demo.yaml") for c in ran)
    assert any(c.startswith("uda-ray retrain") for c in ran) and any(c.startswith("uda-ray analyze") for c in ran)


def test_readme_smoke_block_and_commands_parse() -> None:
    """Without Ray: the smoke block has its three kinds, and every shell command is one the test knows."""
    text = README.read_text()
    smoke = smoke_overrides(text)
    assert "run.iterations=4" in smoke["run"] and smoke["ablate"] == ["seeds=[0]"]
    commands = [c for lang, body in readme_blocks(text) if lang == "bash" for c in shell_commands(body)]
    known = ("uda-ray ", "tensorboard ", "optuna-dashboard ", "python3 -m venv", ". .venv", "pip ", "pytest",
             *RAY_CLUSTER, "RAY_AUTH_MODE=")
    assert commands and all(c.startswith(known) for c in commands), [c for c in commands if not c.startswith(known)]
