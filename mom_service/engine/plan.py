"""The plan: one request resolved against the config, before any upstream call. Who is asked (with images, only
the members that can see them), who concludes, with what: the conversation in each provider family's shapes,
images checked (and downloaded for the providers that need the bytes), what the cache may do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
from mom_service.errors import InvalidRequest, NotFound
from mom_service.providers.image_fetch import download_all
from mom_service.providers.images import check_images
from mom_service.providers.sanitize import NOTHING_DOWNLOADED, RULES, Family, family, needs_bytes, sanitize


@dataclass(frozen=True, slots=True)
class Request:
    """What the engine is asked, whatever the protocol it came in: a MoM model, an OpenAI-shaped conversation (the
    engine's one shape of messages), the sampling parameters allowed through, and who asks."""

    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    request_id: str
    caller: str = ""  # the caller's identity (a hash of its token): whose cached answers it may see
    stream: bool = False
    user: str | None = None
    cache: CachePolicy | None = None  # what the request lets the cache do (None: the cache is off)


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """What a request's images may be (MOM_MAX_IMAGES, MOM_ALLOW_PRIVATE_IMAGE_URLS, MOM_MAX_IMAGE_BYTES, ...)."""

    max_images: int = 20
    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    fetch_timeout_s: float = 10.0


DEFAULT_IMAGES = ImagePolicy()


@dataclass(slots=True, frozen=True)
class Member:
    """A panel member as this request asks it: the conversation in its provider's shapes, or why it is skipped."""

    llm: LLMDefinition
    messages: list[dict[str, Any]]
    skipped: str | None = None
    encoded: bytes | None = None  # `messages` serialized once, shared by the members that get the same ones


@dataclass(slots=True, frozen=True)
class Concluder:
    """A concluding LLM as this request would ask it: the conversation in its shapes, images or placeholders."""

    llm: LLMDefinition
    conversation: tuple[dict[str, Any], ...]
    images: Literal["sent", "placeholders"] | None


@dataclass(slots=True, frozen=True)
class CachePolicy:
    """What the request lets the cache do (`Cache-Control: no-cache` skips the lookup, `no-store` the storing)."""

    lookup: bool = True
    store: bool = True

    @property
    def used(self) -> bool:
        return self.lookup or self.store


NO_CACHE = CachePolicy(lookup=False, store=False)


@dataclass(slots=True, frozen=True)
class Plan:
    """One request, resolved against the config: who is asked, who concludes, with what."""

    request_id: str
    mom: MoMModelConfig
    members: tuple[Member, ...]
    concluders: tuple[Concluder, ...]  # the concluding LLM, then its fallbacks, in the order they are tried
    has_images: bool
    prompt: str
    params: dict[str, Any]
    stream: bool
    user: str | None = None
    conversation: tuple[dict[str, Any], ...] = ()  # as the client sent it (for the trace)
    cache: CachePolicy = NO_CACHE  # what the cache may do for this request (NO_CACHE when the model's is off)
    cache_owner: str = ""  # whose cached answers it may see: the caller's identity, or "" when shared by everyone


def make_plan(
    config: MoMConfig,
    mom: MoMModelConfig,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    vision: Mapping[str, bool],
    has_images: bool,
    request_id: str,
    stream: bool,
    user: str | None = None,
    cache: CachePolicy | None = None,
    downloaded: Mapping[str, str] = NOTHING_DOWNLOADED,
    caller: str = "",
) -> Plan:
    """Who is asked: with images, only the members that can see them (400 when none can). The conversation is put
    in each provider family's shapes once, and serialized once, for all the LLMs that get the same shapes."""
    shaped: dict[tuple[Family, bool], list[dict[str, Any]]] = {}

    def conversation(llm: LLMDefinition, sees: bool) -> list[dict[str, Any]]:
        key = (family(llm), sees)
        if key not in shaped:
            shaped[key] = sanitize(messages, RULES[key[0]], vision=sees, downloaded=downloaded)
        return shaped[key]

    encoded: dict[int, bytes] = {}
    members = []
    for name in mom.llms_to_query:
        llm = config.llm(name)
        if has_images and not vision[name]:
            members.append(Member(llm, [], skipped="cannot see images (multimodal: false, or not in LiteLLM's info)"))
            continue
        shapes = conversation(llm, True)
        if id(shapes) not in encoded:
            encoded[id(shapes)] = orjson.dumps(shapes, option=orjson.OPT_SORT_KEYS)
        members.append(Member(llm, shapes, encoded=encoded[id(shapes)]))
    if not any(m.skipped is None for m in members):
        raise InvalidRequest(
            f"The MoM model '{mom.name}' cannot answer a request with images: none of its panel members "
            f"({', '.join(mom.llms_to_query)}) can see images.",
            param="messages",
            code="images_not_supported",
        )

    def concluder(name: str) -> Concluder:
        llm = config.llm(name)
        sees = vision[llm.name]
        images: Literal["sent", "placeholders"] | None = ("sent" if sees else "placeholders") if has_images else None
        return Concluder(llm, tuple(conversation(llm, sees)), images)

    return Plan(
        request_id=request_id,
        mom=mom,
        members=tuple(members),
        concluders=tuple(concluder(name) for name in (mom.concluding_llm, *mom.concluding_fallbacks)),
        has_images=has_images,
        prompt=config.concluding_prompt(mom),
        params=params,
        stream=stream,
        user=user,
        conversation=tuple(messages),
        cache=cache if cache is not None and mom.cache.enabled else NO_CACHE,
        cache_owner="" if mom.cache.scope == "global" else caller,
    )


async def prepare(
    request: Request, config: MoMConfig, vision: Mapping[str, bool], images: ImagePolicy = DEFAULT_IMAGES
) -> Plan:
    """The plan of a request: its MoM model (404 when there is none), its images checked, downloaded where a
    provider needs the bytes (400 on any problem), all before any upstream call."""
    mom = config.mom_model(request.model)
    if mom is None:
        raise NotFound(f"The model '{request.model}' does not exist.", code="model_not_found", param="model")
    checked = await check_images(request.messages, max_images=images.max_images, allow_private=images.allow_private)
    downloaded: dict[str, str] = {}  # image URL -> the data: URL of its bytes, for the providers that need them
    asked = (config.llm(n) for n in (*mom.llms_to_query, mom.concluding_llm, *mom.concluding_fallbacks))
    if checked.remote and needs_bytes(asked, vision):
        downloaded = await download_all(checked.remote, max_bytes=images.max_bytes, timeout_s=images.fetch_timeout_s)
    return make_plan(
        config,
        mom,
        request.messages,
        request.params,
        vision=vision,
        has_images=checked.count > 0,
        downloaded=downloaded,
        request_id=request.request_id,
        stream=request.stream,
        user=request.user,
        cache=request.cache,
        caller=request.caller,
    )
