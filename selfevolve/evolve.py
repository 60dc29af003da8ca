"""`selfevolve evolve`: the served model learns from the traffic it serves.

    selfevolve serve model=tiny port=8000
    selfevolve evolve model=http://127.0.0.1:8000/v1 traces=runs/serve/traces.sqlite recipe=rest_em every=256

A client of a running server (policy=openai: `selfevolve serve`, or `vllm serve` with LoRA
updates on), built from the existing seams. Whenever `every` scored traces (a verifier's
score, or a user's `/v1/feedback`) have been logged since the last round started, one round
runs `recipe=` on the trace store (`data=` the store: `sources.logged_tasks`; keys the recipe
takes pass through, e.g. `iterations=1 lr=...`). The round's window — fixed when it starts
(`windows/round-N.json`): the new traces first, then older ones no served version trained on,
at most the recipe's `train_tasks` (the newest) — is the only logged answers it trains on
(`train_traces=`), and its tasks come first in the recipe's train split, so none is cut off
(`trained_on.json`: the logged answers the recipe says it trained on, `Run.trained_on`,
checked to lie inside the window). A promoted round's window is consumed: no trace
is trained into the served lineage twice. A rejected or failed round's window comes back to
the next round, so no verdict is lost with its candidate. Traces logged during a round go to
the next. The prompts logged so far may all be sampled afresh, from the served version where
the recipe samples (`start_adapter=`: ReST-EM, STaR). Its adapters are saved, loaded and
canary-verified on the server as in every run. Then the gate: the candidate and the version
traffic gets now (the adapter named `serve_as`, or the base model before the first
promotion) answer the validation tasks held out from the traffic (`val_fraction` of task
ids, by hash: fixed from the first round, never trained on), greedy; the candidate is
promoted — loaded, verified, under `serve_as` — only when `gate` passes on the recipe's
target metric (acc_t1; acc_t2 for score and self_evolve, each with the recipe's own second
turn): an exact one-sided sign test on the tasks where the two differ, at level
`gate_alpha`, on at least `gate_min_discordant` such tasks, with a gain of at least
`gate_min_gain` points. The candidate is the round's last adapter, chosen without looking at
the validation tasks, so the gate's error rate is the test's. A rejected candidate is
unloaded and kept on disk; a round whose training diverged (a non-finite loss or gradient) is recorded as
failed; the decision and its numbers are logged either way. Clients that ask for
model=`serve_as` get the promoted version; nothing unverified or rejected is ever under
that name.

Every version is a node of the lineage (`lineage.json`, networkx node-link, and
`lineage.graphml`): its parent, the recipe and config, the trace ids it trained on
(`round-N/trained_on.json`), the gate's numbers and decision. `state.json` holds the rounds
recorded and the served version, written last: `kill -9` at any moment and `resume=true`
redo the round in flight on its window, and nothing else. The server is watched between
rounds: one that restarted (forgetting hot-loaded adapters, as vLLM does) gets the served
version loaded and verified again; one that stays away longer than `server_wait_s` stops
evolve with one line. Ctrl-C stops after the round in flight; `rounds=` bounds the run.

In code: `gate` decides from two evaluations (a pure function), `Ledger` holds what was
decided (windows, lineage, state) and answers what a round may train on, `Evolve` runs the
rounds against the server.

Users come first: the round's requests carry `priority` 1 (`request_priority=`, vLLM's
request field; `selfevolve serve` batches a lower priority first, vLLM does with
`--scheduling-policy priority`; request_priority=0 for one without it), and evolve runs at
CPU niceness `nice`, so on a shared machine its training yields the cores to the server.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import networkx as nx
import openai
from pydantic import Field

from selfevolve.config import Keys, build, resolve
from selfevolve.data.store import TraceStore
from selfevolve.errors import NonFinite, SyncError, UserError
from selfevolve.files import atomic_write
from selfevolve.policies.openai import client_key

TARGET = {"score": "acc_t2", "self_evolve": "acc_t2"}  # else acc_t1


class EvolveConfig(Keys):
    """`selfevolve evolve`'s own keys; every other key goes to the recipe."""

    model: str = Field(..., description="the live server's OpenAI-compatible URL (…/v1)")
    traces: str = Field("runs/serve/traces.sqlite", description="the server's trace store")
    recipe: str = Field("rest_em", description="the recipe each round runs on the logged traffic")
    every: int = Field(256, ge=1, description="new scored traces that start a round")
    rounds: int | None = Field(None, ge=1, description="stop after this many rounds (default: run until Ctrl-C)")
    poll_s: float = Field(5.0, gt=0, description="seconds between looks at the store and the server")
    server_wait_s: float = Field(120.0, ge=0, description="how long a server that stopped answering may take to "
                                 "come back before evolve stops")
    gate_alpha: float = Field(0.05, gt=0, lt=1, description="the gate's one-sided level: an identical candidate is "
                              "promoted in at most this share of rounds")
    gate_min_discordant: int = Field(10, ge=1, description="validation tasks on which candidate and served must "
                                     "differ before the gate decides")
    gate_min_gain: float = Field(0.0, ge=0, description="smallest gain, in points of the target metric, to promote")
    nice: int = Field(10, ge=0, le=19, description="evolve's CPU niceness (os.nice): on a machine it shares with the "
                      "server, its training yields the cores to the server's users")
    serve_as: str = Field("evolved", description="the adapter name traffic asks for; only promoted versions")
    run_dir: str = Field("runs/evolve", description="rounds, lineage and state")
    resume: bool = Field(False, description="continue from run_dir/state.json")


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact p-value of `wins` among `wins + losses` fair coin flips: P(X ≥ wins),
    X ~ Binomial(wins + losses, 1/2)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def gate(current: list[float], candidate: list[float], alpha: float = 0.05, min_discordant: int = 10,
         min_gain: float = 0.0) -> dict:
    """Promote or reject from paired per-task outcomes (the same tasks, in the same order).

    wins/losses: the tasks where the candidate scores above/below the served version. The
    candidate is promoted iff wins + losses ≥ `min_discordant`, the exact sign test's
    p-value (`sign_test`) is ≤ `alpha`, and the gain (mean difference, in points) is ≥
    `min_gain`. When candidate and served are equally good each differing task is a fair
    coin, so an identical candidate is promoted with probability ≤ `alpha` whatever the
    number of tasks or how often the two differ (tests/test_evolve_gate.py)."""
    if len(current) != len(candidate) or not current:
        raise ValueError("the gate compares the same non-empty list of tasks")
    wins = sum(b > a for a, b in zip(current, candidate))
    losses = sum(b < a for a, b in zip(current, candidate))
    gain = 100 * (sum(candidate) - sum(current)) / len(current)
    p = sign_test(wins, losses)
    promoted = wins + losses >= min_discordant and p <= alpha and gain >= min_gain and gain > 0
    return {"n": len(current), "wins": wins, "losses": losses, "p_value": round(p, 6), "gain_points": round(gain, 3),
            "decision": "promoted" if promoted else "rejected"}


def split_keys(overrides: dict) -> tuple[dict, dict]:
    """(evolve's keys, the recipe's keys)."""
    own = {k: v for k, v in overrides.items() if k in EvolveConfig.model_fields}
    return own, {k: v for k, v in overrides.items() if k not in own}


class Ledger:
    """What evolve has decided, on disk under `run_dir`: each round's window
    (`windows/round-N.json`: where it was fixed, `upto_seq`, and its trace ids), the lineage
    (`lineage.json` and `.graphml`: every version, its parent and numbers) and `state.json`
    (rounds recorded, the served version), written last. From these and the trace store it
    answers which logged answers a round may train on."""

    def __init__(self, run_dir: Path, store: TraceStore, resume: bool):
        self.dir, self.store = run_dir, store
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / "state.json"
        if state.exists() and not resume:
            raise UserError(f"run_dir={self.dir} holds an evolve run; resume=true continues it")
        self.state = json.loads(state.read_text()) if state.exists() else {"round": 0, "served": None}
        self.lineage = (nx.node_link_graph(json.loads((self.dir / "lineage.json").read_text()), edges="edges")
                        if (self.dir / "lineage.json").exists() else nx.DiGraph())
        if not self.lineage:
            self.lineage.add_node("base", decision="served")
        self._consumed: tuple[tuple[int, ...] | None, set[str]] = (None, set())

    def window_path(self, r: int) -> Path:
        return self.dir / "windows" / f"round-{r}.json"

    def window(self, r: int) -> dict:
        return json.loads(self.window_path(r).read_text())

    def fix_window(self, r: int, limit: int | None) -> dict:
        """Round r's window: written when the round first starts (the newest `limit` pending
        traces), read back when it is redone."""
        path = self.window_path(r)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            upto = self.store.last_seq()
            atomic_write(path, json.dumps({"upto_seq": upto, "trace_ids": self.pending(upto, limit)}))
        return self.window(r)

    def consumed(self) -> set[str]:
        """The traces a served version trained on: the windows of promoted rounds (read once
        per recorded round, not on every poll)."""
        promoted = tuple(r for r in range(self.state["round"])
                         if self.lineage.nodes[f"round-{r}"]["decision"] == "promoted")
        if self._consumed[0] != promoted:
            self._consumed = (promoted, set().union(*(self.window(r)["trace_ids"] for r in promoted)))
        return self._consumed[1]

    def last_upto(self) -> int:
        """Where the last recorded round's window was fixed (0 before the first round)."""
        return self.window(self.state["round"] - 1)["upto_seq"] if self.state["round"] else 0

    def new_scored(self) -> int:
        """Scored traces logged since the last round's window was fixed: what `every` counts
        (an indexed count of the newest rows)."""
        return self.store.count_scored(after=self.last_upto())

    def pending(self, upto: int, limit: int | None = None) -> list[str]:
        """The window a round fixed at `upto` trains on, oldest first: the newest `limit` (all
        when None) scored traces logged up to `upto` that no served version trained on. A
        rejected or failed round's window comes back (no verdict is lost because a candidate
        was), and so does an answer whose verdict came after its round started, though it does
        not count towards `every`. Read newest first and lazily: its cost is the window's (and
        the consumed traces it steps over), not the store's."""
        consumed, out = self.consumed(), []
        for i, _ in self.store.newest_scored(upto):
            if limit is not None and len(out) >= limit:
                break
            if i not in consumed:
                out.append(i)
        return out[::-1]

    def record(self, version: str, parent: str, promoted: bool, **node) -> None:
        """A decided round: its lineage node and edge, the served version if promoted, then
        state.json (last: a round is recorded once it is there)."""
        self.lineage.add_node(version, **{k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                          for k, v in node.items()})
        self.lineage.add_edge(parent, version)
        if promoted:
            self.state["served"] = version
        self.state["round"] += 1
        atomic_write(self.dir / "lineage.json", json.dumps(nx.node_link_data(self.lineage, edges="edges")))
        nx.write_graphml(self.lineage, self.dir / "lineage.graphml")
        atomic_write(self.dir / "state.json", json.dumps(self.state))

    def served_adapter(self) -> str | None:
        """The served version's adapter directory (None: the base model)."""
        return self.lineage.nodes[self.state["served"]]["adapter"] if self.state["served"] else None


class Evolve:
    """The rounds: `recipe(name)` -> (module, config class) and `config_path(name)` -> its
    YAML, the CLI's recipe table, passed in (evolve sits below the command that starts it).
    What it has decided is in `self.ledger`; whether a candidate is promoted, `gate`."""

    def __init__(self, cfg: EvolveConfig, recipe_keys: dict, recipe, config_path):
        self.cfg = cfg
        self.mod, self.cls = recipe(cfg.recipe)
        one = {"iterations": 1} if "iterations" in self.cls.model_fields else {}  # a round is one iteration
        self.recipe_cfg = lambda r, **extra: resolve(self.cls, config_path(cfg.recipe), {
            **one, "request_priority": 1, **recipe_keys, "recipe": cfg.recipe, "model": cfg.model, "policy": "openai",
            "data": cfg.traces, "run_dir": str(Path(cfg.run_dir) / f"round-{r}"), **extra})
        self.recipe_cfg(0)  # every recipe key is checked before anything waits or trains
        if not Path(cfg.traces).is_file():
            raise UserError(f"traces={cfg.traces}: no such trace store (start `selfevolve serve` first)")
        self.ledger = Ledger(Path(cfg.run_dir), TraceStore(cfg.traces), cfg.resume)
        self.stop = False

    def run(self) -> None:
        from selfevolve.build import served_policy

        previous = signal.signal(signal.SIGINT, self._interrupt)
        try:
            self.models()  # a server that is not there yet gets server_wait_s to come up
            state = self.ledger.state
            server = served_policy(self.recipe_cfg(state["round"]))
            self.resync(server, verify=True)  # a resumed run: what the record says is served, verified
            while not self.stop and (self.cfg.rounds is None or state["round"] < self.cfg.rounds):
                if self.ledger.new_scored() < self.cfg.every:
                    time.sleep(self.cfg.poll_s)
                    self.resync(server)  # a restarted server forgot the promoted version
                    continue
                self.round(state["round"])
                self.resync(server)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupt(self, *_):
        print("selfevolve evolve: stopping after the round in flight", file=sys.stderr)
        self.stop = True

    def round(self, r: int) -> None:
        """Train, gate, record. The window (the unseen scored traces when the round starts;
        traces logged during it go to the next) is written first, so a round killed midway is
        redone on the same traces: its half-made directory is moved aside and its adapters
        unloaded; nothing counts as trained on until the round is in state.json."""
        from selfevolve.build import served_policy
        from selfevolve.run import Run

        ledger = self.ledger
        version, parent = f"round-{r}", ledger.state["served"] or "base"
        extra = {"train_traces": str(ledger.window_path(r))}
        if "start_adapter" in self.cls.model_fields and ledger.state["served"]:  # sample from the served version
            extra["start_adapter"] = ledger.served_adapter()
        cfg = self.recipe_cfg(r, **extra)
        limit = cfg.train_limit()
        window = ledger.fix_window(r, limit or None)
        policy = served_policy(self.recipe_cfg(r))
        if Path(cfg.run_dir).exists():  # killed midway earlier
            self.unload_run_adapters(policy, Path(cfg.run_dir), version)
            aside = Path(f"{cfg.run_dir}.interrupted")
            shutil.rmtree(aside, ignore_errors=True)
            Path(cfg.run_dir).rename(aside)
        run = Run(cfg)
        try:
            self.mod.main(cfg, run)
        except NonFinite as e:  # the round diverged: nothing to gate, nothing served
            verdict = {"decision": "failed", "reason": str(e)}
        except openai.APITimeoutError:
            raise SyncError(f"round {r}: a request waited past its timeout (users' requests go first: a server "
                            "never idle starves the round); resume=true redoes the round on the same traces") from None
        except (httpx.HTTPError, openai.APIConnectionError) as e:
            raise SyncError(f"round {r}: the server stopped answering ({type(e).__name__}); "
                            f"resume=true redoes the round on the same traces") from None
        else:
            record = run.dir / "trained_on.json"  # what the recipe says it trained on (Run.trained_on)
            trained = json.loads(record.read_text())["trace_ids"] if record.exists() else []
            outside = set(trained) - set(window["trace_ids"])
            atomic_write(record, json.dumps({"upto_seq": window["upto_seq"], "trace_ids": trained}))
            if outside:  # a recipe that read past its window: nothing of it may be served
                verdict = {"decision": "failed", "reason": f"{cfg.recipe} trained on {len(outside)} logged answers "
                                                           f"outside its window (e.g. {sorted(outside)[0]})"}
            else:
                candidate = self.candidate(run.dir)
                verdict = {"adapter": str(candidate), **self.judge(policy, cfg, candidate, version)}
        self.unload_run_adapters(policy, run.dir, version)
        promoted = verdict["decision"] == "promoted"
        if promoted:
            self.promote(policy, Path(verdict["adapter"]))
        ledger.record(version, parent, promoted, recipe=cfg.recipe, upto_seq=window["upto_seq"],
                      window=len(window["trace_ids"]), config=cfg.model_dump(mode="json"), **verdict)
        if verdict["decision"] == "failed":
            print(f"round {r}: failed ({verdict['reason']}); nothing served", flush=True)
            return
        print(f"round {r}: {verdict['metric']} {verdict['current']:.3f} -> {verdict['candidate']:.3f} "
              f"({verdict['gain_points']:+.1f} points; {verdict['wins']} tasks won, {verdict['losses']} lost, "
              f"p = {verdict['p_value']:.3g}): {verdict['decision']}", flush=True)

    def candidate(self, run_dir: Path) -> Path:
        """The adapter the round's run saved last. Not the run's own selection (`best_adapter`):
        that looked at the validation tasks the gate judges on, and would spend them."""
        saved = sorted((run_dir / "adapters").iterdir(), key=lambda p: p.stat().st_mtime) \
            if (run_dir / "adapters").is_dir() else []
        if not saved:
            raise UserError(f"{run_dir}: the round saved no adapter")
        return saved[-1]

    def judge(self, policy, cfg, candidate: Path, name: str) -> dict:
        """Candidate vs the served version on the held-out validation tasks (greedy, the
        recipe's own turn policy), decided by `gate`."""
        from selfevolve.build import turn_policy_for, verifier_for
        from selfevolve.data.sources import tasks_for
        from selfevolve.evaluation.evaluate import evaluate
        from selfevolve.evaluation.protocol import columns
        from selfevolve.training.publish import saved_update
        from selfevolve.types import SamplingParams

        metric = TARGET.get(cfg.recipe, "acc_t1")
        tasks = tasks_for(cfg, "validation", cfg.val_limit)
        verifier = verifier_for(cfg.verifier, tasks)
        policy = saved_update(candidate).serve(policy, name)  # verified, never under serve_as yet
        sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        turns = turn_policy_for(cfg, policy, verifier) if metric == "acc_t2" else None  # the second turn's
        outcome, scores = {}, {}
        served = self.ledger.served_adapter()
        if served:
            self.attach(policy, self.cfg.serve_as, served)
        for who, adapter in (("current", self.cfg.serve_as if served else None), ("candidate", name)):
            policy.set_adapter(adapter)
            scores[who], traces, _ = evaluate(policy, tasks, verifier, max_turns=2 if metric == "acc_t2" else 1,
                                              critic=turns, sampling=sampling,
                                              baseline_temperature=None, bootstrap=cfg.bootstrap, seed=cfg.seed)
            outcome[who] = columns(traces)[metric].tolist()
        policy.set_adapter(None)
        policy.unload_adapter(name)
        decided = gate(outcome["current"], outcome["candidate"], self.cfg.gate_alpha, self.cfg.gate_min_discordant,
                       self.cfg.gate_min_gain)
        return {"metric": metric, "current": scores["current"][metric], "candidate": scores["candidate"][metric],
                **decided}

    def attach(self, policy, name: str, path: str) -> None:
        """Make the server's adapter `name` (loaded under that exact name, which traffic asks
        for, not the client's versioned one) addressable through `policy`."""
        policy.adapters[name], policy.served_names[name] = path, name

    def models(self) -> list[str]:
        """The ids the server lists; a server that stopped answering gets `server_wait_s` to
        come back (a restart), else SyncError: evolve stops, and resume=true continues."""
        deadline = time.monotonic() + self.cfg.server_wait_s
        while True:
            try:
                r = httpx.get(self.cfg.model.rstrip("/") + "/models", timeout=30,
                              headers={"Authorization": f"Bearer {client_key()}"})
                r.raise_for_status()
                return [m["id"] for m in r.json()["data"]]
            except (httpx.HTTPError, ValueError, KeyError) as e:
                if time.monotonic() >= deadline:
                    raise SyncError(f"model={self.cfg.model}: the server did not answer for server_wait_s="
                                    f"{self.cfg.server_wait_s:g} ({type(e).__name__})") from None
                time.sleep(min(self.cfg.poll_s, 1.0))

    def resync(self, policy, verify: bool = False) -> None:
        """Make the server serve, under `serve_as`, what state.json says is served: after a
        restart (a server forgets hot-loaded adapters, as vLLM does) the promoted version is
        loaded and verified again; a version under that name the record does not hold (evolve
        killed between a promotion's load and its record) is unloaded. `verify`: check the
        canary of a version that is there too (once, on start)."""
        from selfevolve.training.publish import saved_update

        name, served = self.cfg.serve_as, self.ledger.state["served"]
        there = name in self.models()
        if served is None:
            if there:
                policy.http.post("/unload_lora_adapter", json={"lora_name": name})
            return
        path = self.ledger.served_adapter()
        if there and verify:
            update = saved_update(path)
            self.attach(policy, name, path)
            policy.set_adapter(name)
            try:
                update.verify(policy, name)
                return
            except SyncError:
                pass
            finally:
                policy.set_adapter(None)
        elif there:
            return
        print(f"selfevolve evolve: the server does not serve {served} as {name}: loading and verifying it again",
              file=sys.stderr, flush=True)
        self.promote(policy, Path(path))
        policy.set_adapter(None)

    def promote(self, policy, candidate: Path) -> None:
        """Serve the candidate under `serve_as`, replacing what was there in one step
        (`load_inplace`, vLLM's: requests for the name never find it missing, and the new
        version brings its own config and tensors), verified by its canary. A load that fails
        verification (or that the server cannot score) is undone — the served version loaded
        back, or the name unloaded — and evolve stops on a SyncError."""
        from selfevolve.training.publish import saved_update

        update, name = saved_update(candidate), self.cfg.serve_as
        served = self.ledger.served_adapter()
        back = served if served and Path(served) != candidate else None
        old = saved_update(back) if back else None  # the learner's record of the version it replaces
        previous = old.expected if old is not None and old.canary == update.canary else None

        def load(path) -> None:
            r = policy.http.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(path),
                                                              "load_inplace": True})
            if r.status_code >= 400:
                raise SyncError(f"loading {path} as {name}: the server refused ({r.status_code}: {r.text[:200]})")

        load(candidate)
        self.attach(policy, name, str(candidate))
        policy.set_adapter(name)
        try:
            update.verify(policy, name, previous)  # not nearer the version it replaces than the candidate
        except Exception as e:  # noqa: BLE001 - whatever failed, the served version comes back
            if back:
                load(back)
            else:
                policy.http.post("/unload_lora_adapter", json={"lora_name": name})
            if isinstance(e, SyncError):
                raise
            raise SyncError(f"verifying {candidate} as {name}: {type(e).__name__}: {str(e)[:200]}") from None

    def unload_run_adapters(self, policy, run_dir: Path, version: str) -> None:
        """The round's run leaves its own versions (`iter-N@…`) and the gate's candidate
        (`round-N@…`) on the server if it was killed: unload them."""
        names = {p.name for p in (run_dir / "adapters").iterdir()} if (run_dir / "adapters").is_dir() else set()
        names |= {version, "start"}
        for m in self.models():
            if "@" in m and m.split("@")[0].removesuffix("-selected") in names:
                policy.http.post("/unload_lora_adapter", json={"lora_name": m})


def main(overrides: dict, recipe, config_path) -> None:
    own, recipe_keys = split_keys(overrides)
    if "model" not in own:
        raise UserError("evolve needs model=URL (the live server's …/v1)")
    evolve = Evolve(build(EvolveConfig, own), recipe_keys, recipe, config_path)
    os.nice(evolve.cfg.nice)  # once per process (os.nice adds)
    evolve.run()
