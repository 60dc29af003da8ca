"""`selfevolve evolve`: the served model learns from the traffic it serves.

    selfevolve serve model=tiny port=8000
    selfevolve evolve model=http://127.0.0.1:8000/v1 traces=runs/serve/traces.sqlite recipe=rest_em every=256

A client of a running server (policy=openai: `selfevolve serve`, or `vllm serve` with LoRA
updates on), built from the existing seams. Whenever `every` new scored traces have been
logged (a verifier's score, or a user's `/v1/feedback`), one round runs `recipe=` on the
trace store (`data=` the store: `data.logged_tasks`; keys the recipe takes pass through,
e.g. `iterations=1 lr=...`), whose adapters are saved, loaded and canary-verified on the
server as in every run. Then the gate: the candidate and the version traffic gets now (the
adapter named `serve_as`, or the base model before the first promotion) answer the
validation tasks held out from the traffic (`val_fraction` of task ids, by hash: fixed from
the first round, never trained on), greedy; the candidate is promoted — loaded, verified,
under `serve_as` — only when its mean gain in the recipe's target metric (acc_t1; acc_t2
for score and self_evolve) is > 0 and the lower end of the paired-bootstrap 95% interval is
≥ −gate_margin. A rejected candidate is unloaded and kept on disk; a round whose training
diverged (a non-finite loss or gradient) is recorded as failed; the decision and its numbers
are logged either way. Clients that ask for model=`serve_as` get the promoted
version; nothing unverified or rejected is ever under that name.

Every version is a node of the lineage (`lineage.json`, networkx node-link, and
`lineage.graphml`): its parent, the recipe and config, the store position it trained up to
and its train-role trace ids (`round-N/trained_on.json`), the gate's numbers and decision.
`state.json` holds the store position and the served version; `resume=true` continues
from it. Ctrl-C stops after the round in flight; `rounds=` bounds the run.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import networkx as nx
from pydantic import Field

from .config import Keys, build, resolve
from .errors import NonFinite, UserError
from .files import atomic_write
from .store import TraceStore

TARGET = {"score": "acc_t2", "self_evolve": "acc_t2"}  # else acc_t1


class EvolveConfig(Keys):
    """`selfevolve evolve`'s own keys; every other key goes to the recipe."""

    model: str = Field(..., description="the live server's OpenAI-compatible URL (…/v1)")
    traces: str = Field("runs/serve/traces.sqlite", description="the server's trace store")
    recipe: str = Field("rest_em", description="the recipe each round runs on the logged traffic")
    every: int = Field(256, ge=1, description="new scored traces that start a round")
    rounds: int | None = Field(None, ge=1, description="stop after this many rounds (default: run until Ctrl-C)")
    poll_s: float = Field(5.0, gt=0, description="seconds between looks at the store")
    gate_margin: float = Field(0.0, ge=0, description="promote when the gain's interval reaches no lower than -this")
    serve_as: str = Field("evolved", description="the adapter name traffic asks for; only promoted versions")
    run_dir: str = Field("runs/evolve", description="rounds, lineage and state")
    resume: bool = Field(False, description="continue from run_dir/state.json")


def split_keys(overrides: dict) -> tuple[dict, dict]:
    """(evolve's keys, the recipe's keys)."""
    own = {k: v for k, v in overrides.items() if k in EvolveConfig.model_fields}
    return own, {k: v for k, v in overrides.items() if k not in own}


class Evolve:
    """`recipe(name)` -> (module, config class) and `config_path(name)` -> its YAML: the CLI's
    recipe table, passed in (evolve sits below the command that starts it)."""

    def __init__(self, cfg: EvolveConfig, recipe_keys: dict, recipe, config_path):
        self.cfg, self.dir = cfg, Path(cfg.run_dir)
        self.mod, cls = recipe(cfg.recipe)
        self.keys = recipe_keys
        self.recipe_cfg = lambda r: resolve(cls, config_path(cfg.recipe), {
            "iterations": 1, **self.keys, "recipe": cfg.recipe, "model": cfg.model, "policy": "openai",
            "data": cfg.traces, "run_dir": str(self.dir / f"round-{r}")})
        self.recipe_cfg(0)  # every recipe key is checked before anything waits or trains
        if not Path(cfg.traces).is_file():
            raise UserError(f"traces={cfg.traces}: no such trace store (start `selfevolve serve` first)")
        self.store = TraceStore(cfg.traces)
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / "state.json"
        if state.exists() and not cfg.resume:
            raise UserError(f"run_dir={self.dir} holds an evolve run; resume=true continues it")
        self.state = json.loads(state.read_text()) if state.exists() else {"round": 0, "seq": 0, "served": None}
        self.lineage = (nx.node_link_graph(json.loads((self.dir / "lineage.json").read_text()), edges="edges")
                        if (self.dir / "lineage.json").exists() else nx.DiGraph())
        if not self.lineage:
            self.lineage.add_node("base", decision="served")
        self.stop = False

    def new_scored(self) -> int:
        return self.store.count(min_score=0.0, from_seq=self.state["seq"] + 1)

    def run(self) -> None:
        previous = signal.signal(signal.SIGINT, self._interrupt)
        try:
            while not self.stop and (self.cfg.rounds is None or self.state["round"] < self.cfg.rounds):
                if self.new_scored() < self.cfg.every:
                    time.sleep(self.cfg.poll_s)
                    continue
                self.round(self.state["round"])
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupt(self, *_):
        print("selfevolve evolve: stopping after the round in flight", file=sys.stderr)
        self.stop = True

    def round(self, r: int) -> None:
        from .build import served_policy
        from .run import Run

        upto = self.store.last_seq()  # traces logged during the round go to the next one
        cfg = self.recipe_cfg(r)
        run = Run(cfg)
        version, parent = f"round-{r}", self.state["served"] or "base"
        policy = served_policy(cfg)
        try:
            self.mod.main(cfg, run)
        except NonFinite as e:  # the round diverged: nothing to gate, nothing served
            gate = {"decision": "failed", "reason": str(e)}
        else:
            trained = sorted({t.task.id for t in run.store.iter() if not {"eval", "baseline"} & set(t.meta)})
            atomic_write(run.dir / "trained_on.json", json.dumps({"upto_seq": upto, "task_ids": trained}))
            candidate = self.candidate(run.dir)
            gate = {"adapter": str(candidate), **self.gate(policy, cfg, candidate, version)}
        self.unload_run_adapters(policy, run.dir)
        self.lineage.add_node(version, recipe=cfg.recipe, upto_seq=upto, config=json.dumps(cfg.model_dump(mode="json")),
                              **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in gate.items()})
        self.lineage.add_edge(parent, version)
        if gate["decision"] == "promoted":
            self.promote(policy, Path(gate["adapter"]))
            self.state["served"] = version
        self.state.update(round=r + 1, seq=upto)
        self.save()
        if gate["decision"] == "failed":
            print(f"round {r}: failed ({gate['reason']}); nothing served", flush=True)
            return
        print(f"round {r}: {gate['metric']} {gate['current']:.3f} -> {gate['candidate']:.3f} "
              f"(gain {gate['gain']:+.3f}, 95% [{gate['interval'][0]:+.3f}, {gate['interval'][1]:+.3f}]): "
              f"{gate['decision']}", flush=True)

    def candidate(self, run_dir: Path) -> Path:
        """The adapter the round's run ended with (its summary's selection, else its last)."""
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("best_adapter"):
            return run_dir / summary["best_adapter"]
        saved = sorted((run_dir / "adapters").iterdir(), key=lambda p: p.stat().st_mtime)
        if not saved:
            raise UserError(f"{run_dir}: the round saved no adapter")
        return saved[-1]

    def gate(self, policy, cfg, candidate: Path, name: str) -> dict:
        """Candidate vs the served version on the held-out validation tasks, paired."""
        from .build import verifier_for
        from .data import tasks_for
        from .evaluate import evaluate
        from .protocol import paired_difference
        from .sync import saved_update
        from .types import SamplingParams

        metric = TARGET.get(cfg.recipe, "acc_t1")
        tasks = tasks_for(cfg, "validation", cfg.val_limit)
        verifier = verifier_for(cfg.verifier, tasks)
        policy = saved_update(candidate).serve(policy, name)  # verified, never under serve_as yet
        sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        out, scores = {}, {}
        if self.state["served"]:
            self.attach(policy, self.cfg.serve_as, self.lineage.nodes[self.state["served"]]["adapter"])
        for who, adapter in (("current", self.cfg.serve_as if self.state["served"] else None), ("candidate", name)):
            policy.set_adapter(adapter)
            scores[who], out[who], _ = evaluate(policy, tasks, verifier, max_turns=2 if metric == "acc_t2" else 1,
                                      sampling=sampling, baseline_temperature=None, bootstrap=cfg.bootstrap,
                                      seed=cfg.seed)
        policy.set_adapter(None)
        policy.unload_adapter(name)
        diff = paired_difference(out["current"], out["candidate"], resamples=cfg.bootstrap, seed=cfg.seed)
        gain, interval = diff["difference"][metric], diff["intervals"][metric]
        promoted = gain > 0 and interval[0] >= -self.cfg.gate_margin
        return {"metric": metric, "n": diff["n"], "current": scores["current"][metric],
                "candidate": scores["candidate"][metric], "gain": gain,
                "interval": interval, "decision": "promoted" if promoted else "rejected"}

    def attach(self, policy, name: str, path: str) -> None:
        """Make the server's adapter `name` (loaded under that exact name, which traffic asks
        for, not the client's versioned one) addressable through `policy`."""
        policy.adapters[name], policy.served_names[name] = path, name

    def promote(self, policy, candidate: Path) -> None:
        """Serve the candidate under `serve_as`, verified by its canary; the old version is
        unloaded first (a load under a used name must not mix two versions' files). A load
        that fails verification is unloaded again, and evolve stops on the SyncError."""
        from .sync import SyncError, saved_update, verify_sync

        update, name = saved_update(candidate), self.cfg.serve_as
        policy.http.post("/unload_lora_adapter", json={"lora_name": name})  # 404 before the first promotion
        r = policy.http.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(candidate)})
        if r.status_code >= 400:
            raise UserError(f"promoting {candidate} as {name}: the server refused ({r.status_code}: {r.text[:200]})")
        self.attach(policy, name, str(candidate))
        policy.set_adapter(name)
        try:
            verify_sync(policy, name, update.expected, update.tol, update.canary)
        except SyncError:
            policy.http.post("/unload_lora_adapter", json={"lora_name": name})
            raise

    def unload_run_adapters(self, policy, run_dir: Path) -> None:
        """The round's run leaves its own versions (`iter-N@…`) on the server: unload them."""
        names = {p.name for p in (run_dir / "adapters").iterdir()} if (run_dir / "adapters").is_dir() else set()
        for m in policy.http.get("/models").json().get("data", []):
            if m["id"].split("@")[0].removesuffix("-selected") in names and "@" in m["id"]:
                policy.http.post("/unload_lora_adapter", json={"lora_name": m["id"]})

    def save(self) -> None:
        atomic_write(self.dir / "lineage.json", json.dumps(nx.node_link_data(self.lineage, edges="edges")))
        nx.write_graphml(self.lineage, self.dir / "lineage.graphml")
        atomic_write(self.dir / "state.json", json.dumps(self.state))


def main(overrides: dict, recipe, config_path) -> None:
    own, recipe_keys = split_keys(overrides)
    if "model" not in own:
        raise UserError("evolve needs model=URL (the live server's …/v1)")
    Evolve(build(EvolveConfig, own), recipe_keys, recipe, config_path).run()
