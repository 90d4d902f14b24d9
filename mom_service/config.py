"""config.yaml: its models, loading (its problems described by config_checks.py), and the built-in demo config."""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core.core_schema import ValidatorFunctionWrapHandler

from mom_service.config_checks import check_references, describe_validation_error
from mom_service.errors import ConfigError
from mom_service.settings import Settings

DEFAULT_CONFIG_PATH = "config.yaml"
DEFAULT_LLM_TIMEOUT_S = 120.0

# Keys the engine sets itself: a config `params` entry may not set them (keys live in the environment).
RESERVED_PARAMS = frozenset(
    {"model", "messages", "stream", "stream_options", "n", "api_key", "api_base", "base_url", "timeout"}
)

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")]
# a panel member: an LLM's name, or one of its samples (NAME#1, NAME#2, ...: an entry with `samples`)
MemberName = Annotated[str, Field(min_length=1, max_length=140, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*(#[0-9]+)?$")]

# A reasoning effort, on OpenAI's scale (`reasoning_effort`), from the least to the most.
Level = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
LEVELS: tuple[Level, ...] = ("none", "minimal", "low", "medium", "high", "xhigh")
# What a tier's LLMs are asked with: a level, the request's own level (`client`), or nothing (`none`).
TierEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "client"]

# Providers (LiteLLM's prefixes) that are servers run by the operator: `local: null` makes their LLMs local.
# (`openai/` behind an api_base is not among them: a local server and a remote proxy look the same; say `local`.)
LOCAL_PROVIDERS = frozenset({"ollama", "ollama_chat", "hosted_vllm", "llamafile", "lm_studio"})

DEFAULT_CONCLUDING_PROMPT = (
    "You are the concluding model of a panel. Several models answered the user's last message; their answers "
    "follow. Compare them, keep what is correct and useful, resolve disagreements, drop mistakes, and write one "
    "answer that is better than any of them. Answer the user directly: do not mention the panel or the models."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pricing(_Strict):
    """USD per million tokens."""

    input_per_million: Decimal = Field(ge=0)
    output_per_million: Decimal = Field(ge=0)
    reasoning_per_million: Decimal | None = Field(default=None, ge=0)
    cached_input_per_million: Decimal | None = Field(default=None, ge=0)


class Capabilities(_Strict):
    """What an LLM can do, when LiteLLM's model info does not say (or says wrong): null asks it; an LLM it does
    not know (an OpenAI-compatible server behind api_base) is assumed able."""

    tools: bool | None = None  # calls tools (function calling)
    structured_output: bool | None = None  # honours response_format json_schema
    # takes `reasoning_effort`; unlike the others, an LLM LiteLLM does not know is assumed NOT to (null: not sent)
    reasoning: bool | None = None


class LLMDefinition(_Strict):
    name: Name
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, min_length=1)
    api_base: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(default=DEFAULT_LLM_TIMEOUT_S, gt=0)
    retries: int = Field(default=1, ge=0, le=10)
    multimodal: bool | None = None
    capabilities: Capabilities = Field(default_factory=Capabilities)
    pricing: Pricing | None = None
    # A server the operator runs (llama.cpp, Ollama, vLLM...): priced at zero unless `pricing` says otherwise, and
    # /health/ready waits until it answers. null: local when the provider prefix is a local runtime.
    local: bool | None = None
    system_prompt: str | None = Field(default=None, min_length=1)  # first in every call to it as a panel member

    @property
    def is_local(self) -> bool:
        """Whether the operator runs this LLM's server (`local`, else its provider prefix says so)."""
        if self.local is not None:
            return self.local
        return self.model.partition("/")[0] in LOCAL_PROVIDERS

    @field_validator("api_base")
    @classmethod
    def _api_base_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("params")
    @classmethod
    def _no_reserved_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_PARAMS.intersection(value))
        if reserved:
            raise ValueError(
                f"may not set {', '.join(reserved)} (the service sets these; put keys in api_key_env, "
                "the URL in api_base, the deadline in timeout)"
            )
        return value


class PromptDefinition(_Strict):
    name: Name
    content: str = Field(min_length=1)


class CacheConfig(_Strict):
    enabled: bool = True
    ttl_seconds: int = Field(default=3600, gt=0)
    # caller: each caller (API token) sees only the answers given to itself; global: every caller shares them
    # (faster and cheaper, but a caller can tell that another asked the same thing: `mom.cache` says "hit").
    scope: Literal["caller", "global"] = "caller"


class ToolsConfig(_Strict):
    """How a MoM model answers a request with tools (docs/tools.md)."""

    # synthesize: members propose (text and/or calls), the concluding LLM decides with the real tools.
    # vote: members get the real tools; when vote_threshold of them propose the same calls, those are the answer.
    strategy: Literal["synthesize", "vote"] = "synthesize"
    vote_threshold: int = Field(default=2, ge=1)
    # A conversation ending with tool results: relay it to the concluding LLM alone, or ask the whole panel again.
    continuation: Literal["relay", "panel"] = "relay"


class OverridesConfig(_Strict):
    """What a caller may change for one request (docs/steering.md): anything at all (`enabled`), and which LLMs
    outside the MoM model's own (its panel and concluding chain) it may add to the panel or make concluding."""

    enabled: bool = True
    allowed_llms: list[Name] = Field(default_factory=list)


class TierConfig(_Strict):
    """One effort tier of a MoM model: who is asked, who concludes, with what effort (docs/steering.md)."""

    llms_to_query: list[Name] | None = Field(default=None, min_length=1)  # default: the MoM model's
    concluding_llm: Name | None = None  # default: the MoM model's (its fallbacks follow it)
    effort: TierEffort = "client"  # the members' `reasoning_effort`: a level, the request's (`client`), or none
    concluding_effort: TierEffort = "client"  # the concluding call's, likewise


class SampleConfig(_Strict):
    """An entry of llms_to_query that samples one LLM several times (Self-MoA): members NAME#1 ... NAME#N."""

    llm: Name
    samples: int = Field(default=1, ge=1, le=32)
    temperature: float | None = Field(default=None, ge=0, le=2)  # each sample's call's (None: the request's)


def expand_samples(entries: Any) -> tuple[Any, dict[str, float | None]]:
    """llms_to_query with each `{llm, samples, temperature}` entry as its members' names, and their temperatures."""
    if not isinstance(entries, list):
        return entries, {}
    names: list[Any] = []
    temperatures: dict[str, float | None] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            names.append(entry)
            continue
        spec = SampleConfig.model_validate(entry)
        for number in range(1, spec.samples + 1):
            names.append(f"{spec.llm}#{number}")
            temperatures[f"{spec.llm}#{number}"] = spec.temperature
    return names, temperatures


Strategy = Literal["synthesize", "rank", "best_of", "vote", "layers"]
STRATEGIES: tuple[str, ...] = ("synthesize", "rank", "best_of", "vote", "layers")


class MoMModelConfig(_Strict):
    name: Name
    description: str | None = None
    # LLM names, or {llm: NAME, samples: N, temperature: T} entries (members NAME#1 ... NAME#N)
    llms_to_query: list[MemberName] = Field(min_length=1)
    concluding_llm: Name
    concluding_prompt: Name | None = None
    include_thinking_context: bool = False
    thinking_format: Literal["think_tags", "reasoning_content"] = "think_tags"
    min_successful: int = Field(default=1, ge=1)
    quorum: int | None = Field(default=None, ge=1)
    member_deadline_ms: int | None = Field(default=None, gt=0)
    # A member cut off by the quorum or the deadline gives the concluding LLM what it had written, marked partial.
    partial_answers: bool = False
    # Members called streaming (their text seen as they write it): on, off, or auto (default): when their text is
    # used live, i.e. reasoning_content thinking in a streamed answer, or partial_answers with a quorum or deadline.
    # The progress stream (docs/progress.md) shows member_delta events only for members streamed; a request turns
    # it on with `mom.stream_members: "on"` (the playground does). Each streamed chunk costs a read, a parse and an
    # event: about 40 us of CPU (docs/benchmarks.md).
    stream_members: Literal["auto", "on", "off"] = "auto"
    concluding_fallbacks: list[Name] = Field(default_factory=list)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    # A hard cap on what one request may cost (USD), unless the request sets its own (`mom.max_cost_usd`).
    max_cost_usd: Decimal | None = Field(default=None, ge=0)
    overrides: OverridesConfig = Field(default_factory=OverridesConfig)
    # Effort tiers: the request's reasoning effort picks one (the nearest level); none: the effort is passed on.
    tiers: dict[Level, TierConfig] | None = Field(default=None, min_length=1)
    # What follows the panel's answers (docs/strategies): synthesize (one concluding answer), rank (peer rankings,
    # then a synthesis in ranked order), best_of (the concluding LLM picks one answer, returned verbatim), vote
    # (the most common final answer wins; ties go to best_of), layers (the panel answers again, `layers` rounds, each
    # with the round before's answers as references).
    strategy: Strategy = "synthesize"
    rankers: list[Name] | None = Field(default=None, min_length=1)  # rank: who ranks (default: the members)
    vote_pattern: str | None = None  # vote: a regex whose first group (or whole match) is an answer's final answer
    layers: int = Field(default=2, ge=1)  # layers: how many rounds the panel answers (Mixture-of-Agents)

    _temperatures: dict[str, float | None] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _sampled(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        temperatures: dict[str, float | None] = {}
        if isinstance(data, dict) and "llms_to_query" in data:
            names, temperatures = expand_samples(data["llms_to_query"])
            data = {**data, "llms_to_query": names}
        model = handler(data)
        if temperatures:
            model._temperatures = temperatures
        return model

    def temperature_of(self, member: str) -> float | None:
        """A sample's own temperature (None: the request's)."""
        return self._temperatures.get(member)

    @field_validator("vote_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    def own_llms(self) -> list[str]:
        """Its own LLMs: its panel, its concluding chain, and its tiers'."""
        names = [*self.llms_to_query, self.concluding_llm, *self.concluding_fallbacks]
        for tier in (self.tiers or {}).values():
            names += [*(tier.llms_to_query or ()), *([tier.concluding_llm] if tier.concluding_llm else [])]
        return names


class MoMConfig(_Strict):
    llm_definitions: list[LLMDefinition] = Field(min_length=1)
    prompt_definitions: list[PromptDefinition] = Field(default_factory=list)
    models: list[MoMModelConfig] = Field(min_length=1)

    _llms: dict[str, LLMDefinition] = PrivateAttr(default_factory=dict)
    _prompts: dict[str, PromptDefinition] = PrivateAttr(default_factory=dict)
    _models: dict[str, MoMModelConfig] = PrivateAttr(default_factory=dict)
    _digest: str | None = PrivateAttr(default=None)

    @property
    def digest(self) -> str | None:
        """The SHA-256 (hex) of the file's bytes this config was read from; None when it was read from no file."""
        return self._digest

    def model_post_init(self, context: Any, /) -> None:
        self._llms = {d.name: d for d in self.llm_definitions}
        for model in self.models:  # each sample (NAME#2) is an LLM of its own: its NAME's definition, renamed
            for name in model.own_llms():
                base = name.partition("#")[0]
                if "#" in name and name not in self._llms and base in self._llms:
                    self._llms[name] = self._llms[base].model_copy(update={"name": name})
                    self.llm_definitions.append(self._llms[name])
        self._prompts = {p.name: p for p in self.prompt_definitions}
        self._models = {m.name: m for m in self.models}

    def llm(self, name: str) -> LLMDefinition:
        return self._llms[name]

    def mom_model(self, name: str) -> MoMModelConfig | None:
        return self._models.get(name)

    def concluding_prompt(self, model: MoMModelConfig) -> str:
        if model.concluding_prompt is None:
            return DEFAULT_CONCLUDING_PROMPT
        return self._prompts[model.concluding_prompt].content


def parse_config(raw: Any, source: str) -> MoMConfig:
    """Validate an already-parsed YAML document; every problem is named with its file, entry and field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must be a YAML mapping with llm_definitions, prompt_definitions, models")
    try:
        config = MoMConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(source, raw, exc)) from None
    problems = check_references(source, config)
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def load_config(path: str | Path) -> MoMConfig:
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    config = parse_config(raw, source)
    config._digest = hashlib.sha256(data).hexdigest()
    return config


def demo_config() -> MoMConfig:
    """The offline demo: a panel of mock models through LiteLLM's `mock_response`, no keys, no network."""
    answers = {
        "demo-analyst": "The analyst's view: break the question into parts and answer each one with facts.",
        "demo-skeptic": "The skeptic's view: check the assumptions first; some claims need evidence.",
        "demo-writer": "The writer's view: a short, clear answer with one example is easiest to follow.",
    }
    raw: dict[str, Any] = {
        "llm_definitions": [
            {
                "name": name,
                "model": "openai/gpt-4o-mini",
                "params": {"mock_response": text},
                "multimodal": True,
                "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
            }
            for name, text in answers.items()
        ]
        + [
            {
                "name": "demo-synthesizer",
                "model": "openai/gpt-4o-mini",
                "params": {
                    "mock_response": "This is the demo synthesis of three mock panel answers: split the "
                    "question into parts, check its assumptions, and answer clearly with an example. "
                    "Configure real providers in config.yaml to get real answers."
                },
                "multimodal": True,
                "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
            }
        ],
        "prompt_definitions": [{"name": "synth_default", "content": DEFAULT_CONCLUDING_PROMPT}],
        "models": [
            {
                "name": "mom",
                "description": "Demo panel of three mock models (offline)",
                "llms_to_query": list(answers),
                "concluding_llm": "demo-synthesizer",
                "concluding_prompt": "synth_default",
            },
            {
                "name": "mom-thinking",
                "description": "The demo panel, showing each member's answer in a <think> block",
                "llms_to_query": list(answers),
                "concluding_llm": "demo-synthesizer",
                "concluding_prompt": "synth_default",
                "include_thinking_context": True,
            },
        ],
    }
    return parse_config(raw, "<built-in demo config>")


def resolve_config(settings: Settings) -> tuple[MoMConfig, str | None]:
    """The config to run: MOM_CONFIG, else ./config.yaml, else the demo. Returns it and its path (None for demo)."""
    if settings.mom_config:
        return load_config(settings.mom_config), settings.mom_config
    if Path(DEFAULT_CONFIG_PATH).is_file():
        return load_config(DEFAULT_CONFIG_PATH), DEFAULT_CONFIG_PATH
    return demo_config(), None
