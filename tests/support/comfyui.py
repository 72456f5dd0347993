"""A stand-in ComfyUI server for tests: a real aiohttp server on 127.0.0.1 that answers ComfyUI's HTTP
and WebSocket API as ComfyUI does, runs the graphs it is given one at a time, and misbehaves as a test
tells it to, recording what it receives.

    async with ComfyUIStandIn(hold_at_step=2) as comfy:  # comfy.url: http://127.0.0.1:PORT
        graph = graph_with(WORKFLOW_TXT2IMG, {"5": {"width": 64, "height": 64}, "3": {"steps": 4}})
        ...  # the code under test posts `graph` to f"{comfy.url}/prompt" and listens on /ws
        prompt_id = await comfy.started(step=2)
        ...  # and cancels it: POST /interrupt {"prompt_id": prompt_id}
        assert comfy.interrupts == [prompt_id]

Written from ComfyUI's own source (Comfy-Org/ComfyUI at v0.3.64, a125cd84, and a fork carrying
upstream v0.8.0, pollockjj/ComfyUI 618b803d), not from memory:
- `server.py`: the routes (`/ws`, `/prompt`, `/queue`, `/interrupt`, `/history`, `/view`,
  `/upload/image`, `/system_stats`, `/object_info`, `/models`, `/free`, each also under `/api`), the
  bodies they answer, `send_json`'s `{"type", "data"}` frames, `queue_updated`'s `status` broadcast.
- `execution.py`: `PromptExecutor.execute_async` (messages and their order, `add_message`'s
  `timestamp`, which of them need a `client_id`), `execute` (`executing` / `executed` per node, the
  cached path), `handle_execution_error`, `validate_prompt` / `validate_inputs` (the error bodies),
  `PromptQueue` (queue items `[number, prompt_id, prompt, extra_data, outputs_to_execute]`, history
  entries, `delete_queue_item`, `get_history`).
- `main.py`: `prompt_worker` (history is written, then `status`, then `executing` `{node: null}`)
  and `hijack_progress` (the `progress` message, sent to everyone when the prompt has no client id).
- `comfy_execution/progress.py` (`progress_state`), `comfy_execution/graph.py` (`ExecutionList`,
  the order nodes run in), `nodes.py` (`SaveImage`, `LoadImage`, `KSampler`, ... inputs and limits),
  `comfy_extras/nodes_video.py` and `comfy_api/latest/_ui.py` (`SaveVideo` answers
  `{"images": [...], "animated": [true]}`), `folder_paths.py` (`get_save_image_path`'s counters).
- `script_examples/websockets_api_example.py`: a caller chooses `prompt_id` and waits for
  `executing` with `node: null`.
- docs.comfy.org: https://docs.comfy.org/development/comfyui-server/comms_routes (routes),
  https://docs.comfy.org/development/comfyui-server/comms_messages (messages).
- Comfy-Org/ComfyUI#9607 (via #2857): `POST /interrupt` takes `{"prompt_id"}`.

What a client sees, in order, for a prompt queued with `client_id` C (to C unless noted):
`status` (everyone: queued) ... `status` (everyone: taken from the queue), `execution_start`
{prompt_id, timestamp}, `execution_cached` {nodes, prompt_id, timestamp}; per node to run:
`progress_state`, `executing` {node, display_node, prompt_id}, for a sampler per step
`progress_state` then `progress` {value (1..steps), max, prompt_id, node}, for an output node
`executed` {node, display_node, output, prompt_id}, then `progress_state`; an output node that is
cached sends only `executed` (its cached output) and `progress_state`. Then `execution_success`
{prompt_id, timestamp} or `execution_error` {prompt_id, node_id, node_type, executed,
exception_message, exception_type, traceback, current_inputs, current_outputs, timestamp} or
`execution_interrupted` {prompt_id, node_id, node_type, executed, timestamp} (to C, or to everyone
when the prompt has no client id); the history entry is written; `status` (everyone); `executing`
{node: null, prompt_id}. Without a client id only `status`, `progress_state`, `progress` (both to
everyone!) and `execution_interrupted` are sent: no `executing`, `executed`, `execution_*`. A
socket connecting with the client id of the running prompt gets `executing` {node} (no prompt_id)
after its `status`.

Like ComfyUI, and worth knowing when driving it:
- Outputs are cached by node inputs: queueing the same graph again runs nothing (`execution_cached`
  names every node, the SaveImage node sends only `executed` with the earlier files, no `progress`);
  nodes that ran before an interrupt or error are cached for the retry. `cache=False` turns this off
  (`--cache-none`); `POST /free` `{"free_memory": true}` empties it.
- `POST /interrupt` with a `prompt_id` that is pending (not running) does nothing: a pending prompt
  is removed with `POST /queue` `{"delete": [...]}`, which in turn ignores the running one.
- Reconnecting with the same `clientId` replaces the old socket, and when the old one then closes
  ComfyUI forgets the client id altogether (its `finally` pops the id): the new socket gets nothing
  more. Close the old socket before opening the new one.
- `GET /history/{id}` is `{}` until the prompt has ended, unknown or not.

Outputs are real files: the procedural backend renders a PNG (or an H.264 MP4) from the positive
CLIPTextEncode's text, the sampler's seed and steps, the latent's size (multiples of 8, as a VAE
gives) and, for img2img, the uploaded image. Nodes it knows: CheckpointLoaderSimple, UNETLoader,
CLIPLoader, VAELoader, ModelSamplingSD3, CLIPTextEncode, EmptyLatentImage, EmptyHunyuanLatentVideo,
KSampler, VAEEncode, VAEDecode, LoadImage, ImageScale, SaveImage, PreviewImage, CreateVideo,
SaveVideo (core, output under `images` with `animated`), VHS_VideoCombine (the VideoHelperSuite
custom node, output under `gifs`). Any other class_type fails validation, as an uninstalled custom
node does.

Behaviour, set by constructor keywords or attributes (read when used):

| attribute | effect |
| --- | --- |
| `step_s` | pause per sampler step (each step then sends `progress`) |
| `hold_at_step` | the sampler stops after that step's `progress` until `release()` or an interrupt |
| `fail_at_node` | `execution_error` at that node (history `status_str` `error`) |
| `fail_with` | its `exception_message`; alone: the failure is at the first sampler |
| `fail_type` | its `exception_type` (default `RuntimeError`; ComfyUI's OOM: `torch.OutOfMemoryError`) |
| `fail_at_step` | a failing sampler first sends that many steps |
| `silent_ws` | sockets stay open, get their first `status`, then nothing; prompts run, history fills in |
| `drop_ws_after` | each socket is cut (no close frame) once sent that many messages (first `status` too) |
| `reject_prompts` | that many `POST /prompt` answer 500 (nothing queued) |
| `slow_history` | seconds `GET /history...` waits before answering |
| `concurrency` | prompts run at once (ComfyUI: 1) |
| `cache` | reuse outputs of unchanged nodes, as ComfyUI does (default True) |
| `previews` | binary preview frames (type 1, JPEG) after each `progress` |
| `models` | model names by folder (`checkpoints`, `vae`, ...; `DEFAULT_MODELS`): others fail validation |

`die()` makes the instance a crashed process: it stops listening, cuts every open connection and
socket without a close frame and stops running prompts; later requests are refused. `revive()`
starts it again on the same port with an empty queue, history and cache (files it wrote or was
sent remain, as on disk).

Recorded: `prompts` (graph as received, by prompt id), `submissions` (each `POST /prompt` body),
`uploads` (name as LoadImage takes it -> bytes), `files` ((type, subfolder, filename) -> bytes),
`interrupts` (prompt ids interrupted), `interrupt_requests` (prompt id named by each `POST
/interrupt`, None for a global one), `deleted` (prompt ids asked to be deleted from the queue),
`removed` (those actually removed, also by `clear`), `events` ((client id or None, type, data) of
every message sent after connect), `hits` (requests by `METHOD /route`), `ws_drops`, `clients`
(client ids with a socket), `history`, `running_prompt_id`, `pending_prompt_ids`. Waits, each
woken by the stand-in's own state changes and bounded by `timeout_s`: `await started(prompt_id=None,
step=0)` (running, and its sampler reached that step), `await finished(prompt_id)` (its history
entry), `await wait_for(predicate)`. Helpers: `graph_with(workflow, {node_id: {input: value}})` (a
changed copy), `messages_of(comfy.events, prompt_id)` (the types of the messages about a prompt).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import heapq
import io
import itertools
import json
import mimetypes
import posixpath
import random
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from services.generation.backends import GenerationInput
from services.generation.backends.procedural import ProceduralBackend
from tests.support import serve_on_loopback

# --- Workflows in API format ("Export (API)"), shared by tests and the backend's examples -------------

WORKFLOW_TXT2IMG: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {
            "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
            "clip": ["4", 1],
        },
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
"""ComfyUI's default workflow: SD 1.5 text to image, its nodes' usual ids."""

WORKFLOW_IMG2IMG: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 280823642470253,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "dpmpp_2m",
            "scheduler": "normal",
            "denoise": 0.87,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["11", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {
            "text": "photograph of victorian woman with wings, sky clouds, meadow grass",
            "clip": ["4", 1],
        },
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "watermark, text", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
}
"""SD 1.5 image to image (ComfyUI's img2img example): the uploaded image "10" encoded, sampled at
denoise < 1. Set `["10"]["inputs"]["image"]` to the name `POST /upload/image` answered."""

WORKFLOW_VIDEO: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 82628696717253,
            "steps": 30,
            "cfg": 6,
            "sampler_name": "uni_pc",
            "scheduler": "simple",
            "denoise": 1,
            "model": ["48", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["40", 0],
        },
    },
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a fox running through snow", "clip": ["38", 0]},
    },
    "7": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "blurry, static, low quality", "clip": ["38", 0]},
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["39", 0]}},
    "37": {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"},
    },
    "38": {
        "class_type": "CLIPLoader",
        "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"},
    },
    "39": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
    "40": {
        "class_type": "EmptyHunyuanLatentVideo",
        "inputs": {"width": 832, "height": 480, "length": 33, "batch_size": 1},
    },
    "48": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 8, "model": ["37", 0]}},
    "49": {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 16}},
    "50": {
        "class_type": "SaveVideo",
        "inputs": {"video": ["49", 0], "filename_prefix": "video/ComfyUI", "format": "mp4", "codec": "h264"},
    },
}
"""Wan 2.1 text to video (ComfyUI's template) ending in core CreateVideo + SaveVideo, which writes
an MP4 (`length` frames, rounded to 4k+1 as the Wan VAE does, at `fps`) and reports it under
`images` with `animated: [true]`, subfolder `video`."""

DEFAULT_MODELS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly-fp16.safetensors"),
    "diffusion_models": ("wan2.1_t2v_1.3B_fp16.safetensors",),
    "text_encoders": ("umt5_xxl_fp8_e4m3fn_scaled.safetensors",),
    "vae": ("wan_2.1_vae.safetensors",),
}

# --- What ComfyUI knows of its nodes --------------------------------------------------------------

_MAX_RESOLUTION = 16384
_SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v",
    "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip
_SCHEDULERS = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
)  # fmt: skip
_CLIP_TYPES = (
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
    "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2",
    "ovis",
)  # fmt: skip
_VHS_FORMATS = ("image/gif", "image/webp", "video/h264-mp4", "video/h265-mp4", "video/webm")
_SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
_SAMPLER_CLASSES = frozenset({"KSampler"})
_CONVERTERS: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


@dataclass(frozen=True)
class _In:
    """One input of a node class: a type (`INT`, `MODEL`, ...), or a combo's `options`, or a combo
    over the model folder `models`, or `upload` (LoadImage's uploaded file, checked on its own)."""

    kind: str
    extra: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    models: str = ""
    optional: bool = False


@dataclass(frozen=True)
class _Node:
    inputs: dict[str, _In]
    returns: tuple[str, ...] = ()
    output: bool = False
    category: str = ""
    module: str = "nodes"


def _int(default: int, minimum: int, maximum: int, **extra: Any) -> _In:
    return _In("INT", {"default": default, "min": minimum, "max": maximum, **extra})


def _float(default: float, minimum: float, maximum: float, **extra: Any) -> _In:
    return _In("FLOAT", {"default": default, "min": minimum, "max": maximum, **extra})


def _combo(*options: str) -> _In:
    return _In("COMBO", options=options)


_NODES: dict[str, _Node] = {
    "CheckpointLoaderSimple": _Node(
        {"ckpt_name": _In("COMBO", models="checkpoints")}, ("MODEL", "CLIP", "VAE"), category="loaders"
    ),
    "UNETLoader": _Node(
        {
            "unet_name": _In("COMBO", models="diffusion_models"),
            "weight_dtype": _combo("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
        },
        ("MODEL",),
        category="advanced/loaders",
    ),
    "CLIPLoader": _Node(
        {
            "clip_name": _In("COMBO", models="text_encoders"),
            "type": _combo(*_CLIP_TYPES),
            "device": replace(_combo("default", "cpu"), optional=True),
        },
        ("CLIP",),
        category="advanced/loaders",
    ),
    "VAELoader": _Node({"vae_name": _In("COMBO", models="vae")}, ("VAE",), category="loaders"),
    "ModelSamplingSD3": _Node(
        {"model": _In("MODEL"), "shift": _float(3.0, 0.0, 100.0, step=0.01)},
        ("MODEL",),
        category="advanced/model",
        module="comfy_extras.nodes_model_advanced",
    ),
    "CLIPTextEncode": _Node(
        {"text": _In("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": _In("CLIP")},
        ("CONDITIONING",),
        category="conditioning",
    ),
    "EmptyLatentImage": _Node(
        {
            "width": _int(512, 16, _MAX_RESOLUTION, step=8),
            "height": _int(512, 16, _MAX_RESOLUTION, step=8),
            "batch_size": _int(1, 1, 4096),
        },
        ("LATENT",),
        category="latent",
    ),
    "EmptyHunyuanLatentVideo": _Node(
        {
            "width": _int(848, 16, _MAX_RESOLUTION, step=16),
            "height": _int(480, 16, _MAX_RESOLUTION, step=16),
            "length": _int(25, 1, _MAX_RESOLUTION, step=4),
            "batch_size": _int(1, 1, 4096),
        },
        ("LATENT",),
        category="latent/video",
        module="comfy_extras.nodes_hunyuan",
    ),
    "KSampler": _Node(
        {
            "model": _In("MODEL"),
            "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
            "steps": _int(20, 1, 10000),
            "cfg": _float(8.0, 0.0, 100.0, step=0.1, round=0.01),
            "sampler_name": _combo(*_SAMPLERS),
            "scheduler": _combo(*_SCHEDULERS),
            "positive": _In("CONDITIONING"),
            "negative": _In("CONDITIONING"),
            "latent_image": _In("LATENT"),
            "denoise": _float(1.0, 0.0, 1.0, step=0.01),
        },
        ("LATENT",),
        category="sampling",
    ),
    "VAEEncode": _Node({"pixels": _In("IMAGE"), "vae": _In("VAE")}, ("LATENT",), category="latent"),
    "VAEDecode": _Node({"samples": _In("LATENT"), "vae": _In("VAE")}, ("IMAGE",), category="latent"),
    "LoadImage": _Node(
        {"image": _In("COMBO", {"image_upload": True}, models="input")}, ("IMAGE", "MASK"), category="image"
    ),
    "ImageScale": _Node(
        {
            "image": _In("IMAGE"),
            "upscale_method": _combo("nearest-exact", "bilinear", "area", "bicubic", "lanczos"),
            "width": _int(512, 0, _MAX_RESOLUTION, step=1),
            "height": _int(512, 0, _MAX_RESOLUTION, step=1),
            "crop": _combo("disabled", "center"),
        },
        ("IMAGE",),
        category="image/upscaling",
    ),
    "SaveImage": _Node(
        {"images": _In("IMAGE"), "filename_prefix": _In("STRING", {"default": "ComfyUI"})},
        output=True,
        category="image",
    ),
    "PreviewImage": _Node({"images": _In("IMAGE")}, output=True, category="image"),
    "CreateVideo": _Node(
        {
            "images": _In("IMAGE"),
            "fps": _float(30.0, 1.0, 120.0, step=1.0),
            "audio": _In("AUDIO", optional=True),
        },
        ("VIDEO",),
        category="image/video",
        module="comfy_extras.nodes_video",
    ),
    "SaveVideo": _Node(
        {
            "video": _In("VIDEO"),
            "filename_prefix": _In("STRING", {"default": "video/ComfyUI"}),
            "format": _combo("auto", "mp4"),
            "codec": _combo("auto", "h264"),
        },
        output=True,
        category="image/video",
        module="comfy_extras.nodes_video",
    ),
    "VHS_VideoCombine": _Node(
        {
            "images": _In("IMAGE"),
            "frame_rate": _float(8.0, 1.0, 1000.0, step=1.0),
            "loop_count": _int(0, 0, 100),
            "filename_prefix": _In("STRING", {"default": "AnimateDiff"}),
            "format": _combo(*_VHS_FORMATS),
            "pingpong": _In("BOOLEAN", {"default": False}),
            "save_output": _In("BOOLEAN", {"default": True}),
            "audio": _In("AUDIO", optional=True),
        },
        ("VHS_FILENAMES",),
        output=True,
        category="Video Helper Suite",
        module="custom_nodes.ComfyUI-VideoHelperSuite",
    ),
}

# --- What flows along the graph's links --------------------------------------------------------------


@dataclass(frozen=True)
class _Thing:
    """A model, CLIP, VAE or conditioning: only its name or text matters here."""

    kind: str
    name: str


@dataclass(frozen=True)
class _Sampling:
    prompt: str
    negative: str
    seed: int
    steps: int


@dataclass(frozen=True)
class _Latent:
    width: int
    height: int
    count: int
    reference: bytes | None = None
    sampling: _Sampling | None = None


@dataclass(frozen=True)
class _Images:
    width: int
    height: int
    count: int
    reference: bytes | None = None
    sampling: _Sampling | None = None
    pixels: bytes | None = None
    """An uploaded image that was never sampled (LoadImage -> SaveImage)."""


@dataclass(frozen=True)
class _Video:
    images: _Images
    fps: float


@dataclass
class _CacheEntry:
    values: tuple[Any, ...]
    ui: dict[str, Any] | None


@dataclass
class _File:
    data: bytes
    content_type: str


class _Interrupted(Exception):
    pass


class _NodeFailure(Exception):
    def __init__(self, message: str, exception_type: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


@dataclass
class _Prompt:
    """One queued prompt as the stand-in holds it."""

    number: float
    prompt_id: str
    graph: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    state: str = "pending"  # pending | running | done | deleted
    outcome: str = ""  # success | error | interrupted
    step: int = 0
    node: str | None = None
    interrupted: bool = False
    released: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: list[list[Any]] = field(default_factory=list)

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return value if isinstance(value, str) else None

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs]


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    request: web.Request
    sid: str
    sent: int = 0
    features: dict[str, Any] = field(default_factory=dict)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error(kind: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _types_match(received: str, wanted: str) -> bool:
    if received == wanted or "*" in (received, wanted):
        return True
    return bool(set(received.split(",")) & set(wanted.split(",")))


def _split_name(name: str) -> tuple[str, str, str]:
    """(folder type, subfolder, filename) of a name as LoadImage takes it: `sub/x.png [input]`."""
    kind = "input"
    for annotation in ("output", "input", "temp"):
        if name.endswith(f" [{annotation}]"):
            kind, name = annotation, name[: -len(annotation) - 3]
            break
    subfolder, _, filename = name.rpartition("/")
    return kind, subfolder, filename


_SERVER_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"
_TRACEBACK = [
    '  File "/ComfyUI/execution.py", line 518, in execute\n'
    "    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(...)\n",
    '  File "/ComfyUI/execution.py", line 329, in get_output_data\n'
    "    return_values = await _async_map_node_over_list(...)\n",
    '  File "/ComfyUI/execution.py", line 303, in _async_map_node_over_list\n'
    "    await process_inputs(input_dict, i)\n",
]


async def _ignore_progress(step: int, total: int) -> None:
    return None


class ComfyUIStandIn:
    """The server; see the module docstring for its knobs and what it records. `url` is its base
    (`http://127.0.0.1:PORT`), valid once started."""

    def __init__(
        self,
        *,
        step_s: float = 0.0,
        hold_at_step: int | None = None,
        fail_at_node: str | None = None,
        fail_with: str = "",
        fail_type: str = "RuntimeError",
        fail_at_step: int = 0,
        silent_ws: bool = False,
        drop_ws_after: int | None = None,
        reject_prompts: int = 0,
        slow_history: float = 0.0,
        concurrency: int = 1,
        cache: bool = True,
        previews: bool = False,
        models: Mapping[str, Sequence[str]] | None = None,
        version: str = "0.8.0",
    ) -> None:
        self.step_s = step_s
        self.hold_at_step = hold_at_step
        self.fail_at_node = fail_at_node
        self.fail_with = fail_with
        self.fail_type = fail_type
        self.fail_at_step = fail_at_step
        self.silent_ws = silent_ws
        self.drop_ws_after = drop_ws_after
        self.reject_prompts = reject_prompts
        self.slow_history = slow_history
        self.concurrency = concurrency
        self.cache = cache
        self.previews = previews
        self.models: dict[str, tuple[str, ...]] = {
            folder: tuple(names)
            for folder, names in (models if models is not None else DEFAULT_MODELS).items()
        }
        self.version = version
        self.prompts: dict[str, dict[str, Any]] = {}
        self.submissions: list[dict[str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.interrupts: list[str] = []
        self.interrupt_requests: list[str | None] = []
        self.deleted: list[str] = []
        self.removed: list[str] = []
        self.events: list[tuple[str | None, str, Any]] = []
        self.hits: Counter[str] = Counter()
        self.ws_drops = 0
        self.port = 0
        self._files: dict[tuple[str, str, str], _File] = {}
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._tick = asyncio.Event()
        self._reset_state()

    def _reset_state(self) -> None:
        """A fresh process: no queue, no history, no cache, no sockets (files stay, as on disk)."""
        self._records: dict[str, _Prompt] = {}
        self._pending: list[tuple[float, str]] = []
        self._running: dict[str, _Prompt] = {}
        self._history: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, _CacheEntry] = {}
        self._sockets: dict[str, _Socket] = {}
        self._outbox: asyncio.Queue[tuple[str | None, dict[str, Any] | bytes]] = asyncio.Queue()
        self._number = 0

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ComfyUIStandIn:
        app = web.Application(middlewares=[self._count], client_max_size=100 * 1024 * 1024)
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("GET", "/ws", self._websocket),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_prompt),
            ("POST", "/history", self._post_history),
            ("GET", "/view", self._view),
            ("POST", "/upload/image", self._upload_image),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/object_info", self._object_info),
            ("GET", "/object_info/{node_class}", self._object_info_node),
            ("GET", "/models", self._list_model_folders),
            ("GET", "/models/{folder}", self._list_models),
            ("POST", "/free", self._post_free),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, "/api" + path, handler)
            app.router.add_route(method, path, handler)
        if self.port:
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
        else:
            runner, self.port = await serve_on_loopback(app)
        self._runner = runner
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._publish())]
        return self

    async def close(self) -> None:
        for record in self._records.values():
            record.interrupted = True
            record.wake.set()
        await self._stop_tasks()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ComfyUIStandIn:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def die(self) -> None:
        """The process crashes: the port stops listening, every connection (HTTP and WebSocket) is
        cut without a close frame, running prompts stop where they are."""
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        server = runner.server
        if server is not None:
            for handler in server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        await self._stop_tasks()
        await runner.cleanup()
        self._runner = None
        self._bump()

    async def revive(self) -> None:
        """Starts again on the same port, as a restarted ComfyUI: empty queue, history and cache."""
        if self._runner is not None:
            return
        self._reset_state()
        await self.start()
        self._bump()

    async def _stop_tasks(self) -> None:
        tasks = self._tasks + [r.task for r in self._records.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # --- what tests wait for --------------------------------------------------------------------

    def _bump(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Returns once `predicate()` holds, re-checking whenever the stand-in's state changes
        (a request, a message, a step); TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._tick.wait()

    async def started(self, prompt_id: str | None = None, step: int = 0, timeout_s: float = 5.0) -> str:
        """Waits until `prompt_id` (or any prompt) has started running and its sampler has sent
        `progress` for step `step` (0: just started); returns the prompt's id."""
        found: list[str] = []

        def reached() -> bool:
            for record in self._records.values():
                if prompt_id is not None and record.prompt_id != prompt_id:
                    continue
                if record.state in ("running", "done") and record.step >= step:
                    found.append(record.prompt_id)
                    return True
            return False

        await self.wait_for(reached, timeout_s)
        return found[0]

    async def finished(self, prompt_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """Waits until `prompt_id` has ended (its history entry exists) and returns that entry."""
        await self.wait_for(lambda: prompt_id in self._history, timeout_s)
        return self._history[prompt_id]

    def release(self) -> None:
        """Lets samplers held at `hold_at_step` go on."""
        for record in self._running.values():
            record.released = True
            record.wake.set()

    @property
    def running_prompt_id(self) -> str | None:
        return next(iter(self._running), None)

    @property
    def pending_prompt_ids(self) -> list[str]:
        return [prompt_id for _, prompt_id in sorted(self._pending)]

    @property
    def history(self) -> dict[str, dict[str, Any]]:
        return self._history

    @property
    def clients(self) -> set[str]:
        """The client ids messages go to (each one's latest socket)."""
        return set(self._sockets)

    # --- HTTP -------------------------------------------------------------------------------------

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else request.path
        self.hits[f"{request.method} {path.removeprefix('/api')}"] += 1
        self._bump()
        return await handler(request)

    def _queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self._pending) + len(self._running)}}

    def _queue_updated(self) -> None:
        self._emit("status", {"status": self._queue_info()}, None)

    async def _post_prompt(self, request: web.Request) -> web.StreamResponse:
        if self.reject_prompts > 0:
            self.reject_prompts -= 1
            return web.Response(status=500, text=_SERVER_ERROR)
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=500, text=_SERVER_ERROR)
        self.submissions.append(copy.deepcopy(body))
        if "number" in body:
            number: float = float(body["number"])
        else:
            number = -self._number if body.get("front") else self._number
            self._number += 1
        if "prompt" not in body:
            no_prompt = _error("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": no_prompt, "node_errors": {}}, status=400)
        graph = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        self.prompts[prompt_id] = copy.deepcopy(graph)
        ok, error, outputs, node_errors = self._validate(graph, body.get("partial_execution_targets"))
        if not ok:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        for key in _SENSITIVE_EXTRA_DATA_KEYS:
            extra_data.pop(key, None)
        extra_data["create_time"] = _now_ms()
        record = _Prompt(number, prompt_id, graph, extra_data, outputs)
        self._records[prompt_id] = record
        heapq.heappush(self._pending, (number, prompt_id))
        self._queue_updated()
        self._bump()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def _get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._queue_info())

    async def _get_queue(self, request: web.Request) -> web.StreamResponse:
        running = [record.item() for record in self._running.values()]
        pending = [self._records[prompt_id].item() for _, prompt_id in self._pending]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("clear"):
            for _, prompt_id in self._pending:
                self._records[prompt_id].state = "deleted"
                self.removed.append(prompt_id)
            self._pending = []
            self._queue_updated()
        for prompt_id in body.get("delete", []):
            self.deleted.append(prompt_id)
            for index, (_, pending_id) in enumerate(self._pending):
                if pending_id == prompt_id:
                    if len(self._pending) == 1:
                        self._queue_updated()  # ComfyUI wipes the queue then: one more `status`
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                    self._records[prompt_id].state = "deleted"
                    self.removed.append(prompt_id)
                    self._queue_updated()
                    break
        self._bump()
        return web.Response()

    async def _post_interrupt(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") or None
        self.interrupt_requests.append(prompt_id)
        for record in list(self._running.values()):
            if prompt_id is None or record.prompt_id == prompt_id:
                record.interrupted = True
                record.wake.set()
        self._bump()
        return web.Response()

    async def _get_history(self, request: web.Request) -> web.StreamResponse:
        if self.slow_history:
            await asyncio.sleep(self.slow_history)
        max_items = request.query.get("max_items")
        offset = int(request.query.get("offset", -1))
        limit = int(max_items) if max_items is not None else None
        if offset < 0 and limit is not None:
            offset = len(self._history) - limit
        out: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(self._history.items()):
            if index >= offset:
                out[prompt_id] = entry
                if limit is not None and len(out) >= limit:
                    break
        return web.json_response(out)

    async def _get_history_prompt(self, request: web.Request) -> web.StreamResponse:
        if self.slow_history:
            await asyncio.sleep(self.slow_history)
        prompt_id = request.match_info["prompt_id"]
        entry = self._history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("clear"):
            self._history.clear()
        for prompt_id in body.get("delete", []):
            self._history.pop(prompt_id, None)
        return web.Response()

    async def _view(self, request: web.Request) -> web.StreamResponse:
        if "filename" not in request.query:
            return web.Response(status=404)
        name, kind = request.query["filename"], request.query.get("type", "output")
        for annotation in ("output", "input", "temp"):
            if name.endswith(f"[{annotation}]"):
                name, kind = name[: -len(annotation) - 3], annotation
        if not name or name[0] == "/" or ".." in name:
            return web.Response(status=400)
        filename = posixpath.basename(name)
        if kind not in ("input", "output", "temp"):
            return web.Response(status=400)
        subfolder = request.query.get("subfolder", "")
        if subfolder.startswith("/") or ".." in subfolder.split("/"):
            return web.Response(status=403)
        file = self._files.get((kind, posixpath.normpath(subfolder) if subfolder else "", filename))
        if file is None:
            return web.Response(status=404)
        return web.Response(
            body=file.data,
            headers={"Content-Disposition": f'filename="{filename}"', "Content-Type": file.content_type},
        )

    async def _upload_image(self, request: web.Request) -> web.StreamResponse:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        if kind not in ("input", "output", "temp"):
            return web.Response(status=500, text=_SERVER_ERROR)
        subfolder = str(post.get("subfolder", ""))
        if subfolder.startswith("/") or ".." in subfolder.split("/") or "/" in image.filename:
            return web.Response(status=400)
        folder = posixpath.normpath(subfolder) if subfolder else ""
        data = image.file.read()
        filename = image.filename
        stem, dot, suffix = filename.rpartition(".")
        if not dot:
            stem, suffix = filename, ""
        overwrite = post.get("overwrite") in ("true", "1")
        for counter in itertools.count(1):
            existing = self._files.get((kind, folder, filename))
            if overwrite or existing is None or existing.data == data:
                break
            filename = f"{stem} ({counter}){dot}{suffix}"
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        self._files[(kind, folder, filename)] = _File(data, content_type)
        self.files[(kind, folder, filename)] = data
        if kind == "input":
            self.uploads[f"{folder}/{filename}" if folder else filename] = data
        self._bump()
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    async def _system_stats(self, request: web.Request) -> web.StreamResponse:
        gib = 1024**3
        stats = {
            "system": {
                "os": sys.platform,
                "ram_total": 64 * gib,
                "ram_free": 48 * gib,
                "comfyui_version": self.version,
                "required_frontend_version": "1.30.6",
                "installed_templates_version": "0.2.11",
                "required_templates_version": "0.2.11",
                "python_version": sys.version,
                "pytorch_version": "2.9.0+cu128",
                "embedded_python": False,
                "argv": ["main.py", "--listen", "127.0.0.1"],
            },
            "devices": [
                {
                    "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
                    "type": "cuda",
                    "index": 0,
                    "vram_total": 24 * gib,
                    "vram_free": 22 * gib,
                    "torch_vram_total": 0,
                    "torch_vram_free": 0,
                }
            ],
        }
        return web.json_response(stats)

    def _node_info(self, name: str) -> dict[str, Any]:
        node = _NODES[name]
        sections: dict[str, dict[str, Any]] = {"required": {}}
        for input_name, spec in node.inputs.items():
            if spec.models == "input":
                kind: Any = sorted(self.uploads)
            elif spec.models:
                kind = list(self.models.get(spec.models, ()))
            elif spec.options:
                kind = list(spec.options)
            else:
                kind = spec.kind
            sections.setdefault("optional" if spec.optional else "required", {})[input_name] = [
                kind,
                spec.extra,
            ]
        return {
            "input": sections,
            "input_order": {section: list(inputs) for section, inputs in sections.items()},
            "output": list(node.returns),
            "output_is_list": [False] * len(node.returns),
            "output_name": list(node.returns),
            "name": name,
            "display_name": name,
            "description": "",
            "python_module": node.module,
            "category": node.category,
            "output_node": node.output,
        }

    async def _object_info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({name: self._node_info(name) for name in _NODES})

    async def _object_info_node(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["node_class"]
        return web.json_response({name: self._node_info(name)} if name in _NODES else {})

    async def _list_model_folders(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(list(self.models))

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        if folder not in self.models:
            return web.Response(status=404)
        return web.json_response(list(self.models[folder]))

    async def _post_free(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("free_memory"):
            self._cache.clear()
        return web.Response()

    # --- WebSocket --------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId", "")
        if sid:
            self._sockets.pop(sid, None)  # reusing a session: the old socket gets nothing more
        else:
            sid = uuid.uuid4().hex
        socket = _Socket(ws, request, sid)
        self._sockets[sid] = socket
        self._bump()
        try:
            await self._deliver(
                socket, {"type": "status", "data": {"status": self._queue_info(), "sid": sid}}
            )
            for record in self._running.values():
                if record.client_id == sid and record.node is not None:
                    await self._deliver(socket, {"type": "executing", "data": {"node": record.node}})
            first = True
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    with contextlib.suppress(ValueError, AttributeError):
                        data = json.loads(message.data)
                        if first and data.get("type") == "feature_flags":
                            socket.features = dict(data.get("data") or {})
                            features = {
                                "supports_preview_metadata": True,
                                "max_upload_size": 100 * 1024 * 1024,
                            }
                            await self._deliver(socket, {"type": "feature_flags", "data": features})
                    first = False
        finally:
            self._sockets.pop(sid, None)  # as ComfyUI: even when a newer socket took the id
            self._bump()
        return ws

    def _emit(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """ComfyUI's `send_sync`: queued, sent in order by the publisher; `sid` None: to everyone."""
        self.events.append((sid, event, data))
        self._outbox.put_nowait((sid, {"type": event, "data": data}))

    def _emit_bytes(self, data: bytes, sid: str | None) -> None:
        self._outbox.put_nowait((sid, data))

    async def _publish(self) -> None:
        while True:
            sid, message = await self._outbox.get()
            if self.silent_ws:
                continue
            if sid is None:
                targets = list(self._sockets.values())
            else:
                socket = self._sockets.get(sid)
                targets = [socket] if socket is not None else []
            for socket in targets:
                await self._deliver(socket, message)

    async def _deliver(self, socket: _Socket, message: dict[str, Any] | bytes) -> None:
        try:
            if isinstance(message, bytes):
                await socket.ws.send_bytes(message)
            else:
                await socket.ws.send_json(message)
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            return
        socket.sent += 1
        if self.drop_ws_after is not None and socket.sent >= self.drop_ws_after:
            if socket.request.transport is not None:
                socket.request.transport.abort()
            if self._sockets.get(socket.sid) is socket:
                del self._sockets[socket.sid]
            self.ws_drops += 1
            self._bump()

    # --- validation (execution.validate_prompt) ----------------------------------------------------

    def _validate(
        self, graph: Any, targets: list[str] | None
    ) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        if not isinstance(graph, dict):
            return False, _error("invalid_prompt", "Prompt is not an object", ""), [], {}
        outputs: list[str] = []
        for node_id, node in graph.items():
            if not isinstance(node, dict) or "class_type" not in node:
                message = "Cannot execute because a node is missing the class_type property."
                return False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            class_type = node["class_type"]
            if class_type not in _NODES:
                message = f"Cannot execute because node {class_type} does not exist."
                return False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            if _NODES[class_type].output and (targets is None or node_id in targets):
                outputs.append(node_id)
        if not outputs:
            return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
        good: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        for output in outputs:
            try:
                valid, reasons = self._validate_inputs(graph, output, validated)
            except Exception as exc:
                valid = False
                reasons = [
                    _error(
                        "exception_during_validation",
                        "Exception when validating node",
                        str(exc),
                        exception_type=type(exc).__name__,
                        traceback=[],
                    )
                ]
                validated[output] = (False, reasons)
            if valid:
                good.append(output)
                continue
            failed.append((output, reasons))
            for node_id, (ok, node_reasons) in validated.items():
                if not ok and node_reasons:
                    entry = node_errors.setdefault(
                        node_id,
                        {
                            "errors": node_reasons,
                            "dependent_outputs": [],
                            "class_type": graph[node_id]["class_type"],
                        },
                    )
                    entry["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for _, errors in failed for e in errors)
            error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
            return False, error, [], node_errors
        return True, None, good, node_errors

    def _validate_inputs(
        self, graph: dict[str, Any], node_id: str, validated: dict[str, tuple[bool, list[dict[str, Any]]]]
    ) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in validated:
            return validated[node_id]
        node = graph[node_id]
        inputs = node.setdefault("inputs", {})
        errors: list[dict[str, Any]] = []
        extra: dict[str, Any]
        valid = True

        def fail(kind: str, message: str, details: str, **extra_info: Any) -> None:
            errors.append(_error(kind, message, details, **extra_info))

        for name, wanted in _NODES[node["class_type"]].inputs.items():
            config = [list(wanted.options) if wanted.options else wanted.kind, wanted.extra]
            if name not in inputs:
                if not wanted.optional:
                    fail("required_input_missing", "Required input is missing", name, input_name=name)
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
                    fail(
                        "bad_linked_input",
                        message,
                        name,
                        input_name=name,
                        input_config=config,
                        received_value=value,
                    )
                    continue
                source_id = value[0]
                received = _NODES[graph[source_id]["class_type"]].returns[value[1]]
                if not _types_match(received, wanted.kind):
                    details = f"{name}, received_type({received}) mismatch input_type({wanted.kind})"
                    message = "Return type mismatch between linked nodes"
                    extra = {"input_config": config, "received_type": received, "linked_node": value}
                    fail("return_type_mismatch", message, details, input_name=name, **extra)
                    continue
                try:
                    if not self._validate_inputs(graph, source_id, validated)[0]:
                        valid = False
                except Exception as exc:
                    valid = False
                    extra = {
                        "exception_message": str(exc),
                        "exception_type": type(exc).__name__,
                        "traceback": [],
                    }
                    reason = _error(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        str(exc),
                        **{"input_name": name, "input_config": config, **extra, "linked_node": value},
                    )
                    validated[source_id] = (False, [reason])
                continue
            converter = _CONVERTERS.get(wanted.kind)
            if converter is not None:
                try:
                    value = inputs[name] = converter(value)
                except (TypeError, ValueError) as exc:
                    message = f"Failed to convert an input value to a {wanted.kind} value"
                    extra = {"received_value": value, "exception_message": str(exc)}
                    fail("invalid_input_type", message, f"{name}, {value}, {exc}", input_name=name, **extra)
                    continue
            if wanted.models == "input":
                if self._input_file(str(value)) is None:  # LoadImage.VALIDATE_INPUTS; no combo check then
                    message = "Custom validation failed for node"
                    fail(
                        "custom_validation_failed",
                        message,
                        f"{name} - Invalid image file: {value}",
                        input_name=name,
                    )
                continue
            extra = {"input_name": name, "input_config": config, "received_value": value}
            if "min" in wanted.extra and value < wanted.extra["min"]:
                fail(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {wanted.extra['min']}",
                    name,
                    **extra,
                )
                continue
            if "max" in wanted.extra and value > wanted.extra["max"]:
                fail(
                    "value_bigger_than_max",
                    f"Value {value} bigger than max of {wanted.extra['max']}",
                    name,
                    **extra,
                )
                continue
            options: Sequence[str] = wanted.options or self.models.get(wanted.models, ())
            if wanted.kind == "COMBO" and value not in options:
                listed = f"(list of length {len(options)})" if len(options) > 20 else str(list(options))
                extra["input_config"] = None if len(options) > 20 else [list(options), wanted.extra]
                fail("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listed}", **extra)
        result = (not errors and valid, errors)
        validated[node_id] = result
        return result

    def _input_file(self, name: str) -> _File | None:
        return self._files.get(_split_name(name))

    # --- execution (PromptExecutor, main.prompt_worker) -------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            while self._pending and len(self._running) < self.concurrency:
                _, prompt_id = heapq.heappop(self._pending)
                record = self._records[prompt_id]
                record.state = "running"
                self._running[prompt_id] = record
                record.task = asyncio.create_task(self._run(record))
            await self._tick.wait()

    def _signature(self, graph: dict[str, Any], node_id: str, memo: dict[str, str]) -> str:
        """The node's inputs all the way up, as ComfyUI's CacheKeySetInputSignature keys outputs."""
        if node_id not in memo:
            node = graph[node_id]
            parts: list[Any] = [node["class_type"]]
            for name, value in sorted(node.get("inputs", {}).items()):
                if _is_link(value):
                    parts.append([name, self._signature(graph, value[0], memo), value[1]])
                else:
                    parts.append([name, value])
            if node["class_type"] == "LoadImage":
                file = self._input_file(str(node["inputs"].get("image", "")))
                parts.append(hashlib.sha256(file.data).hexdigest() if file is not None else None)
            memo[node_id] = json.dumps(parts, sort_keys=True, default=str)
        return memo[node_id]

    def _add_message(
        self, record: _Prompt, event: str, data: dict[str, Any], broadcast: bool = False
    ) -> None:
        data = {**data, "timestamp": _now_ms()}
        record.messages.append([event, data])
        if record.client_id is not None or broadcast:
            self._emit(event, data, record.client_id)

    def _progress_state(self, record: _Prompt) -> None:
        nodes = {
            node_id: {
                "value": state["value"],
                "max": state["max"],
                "state": state["state"],
                "node_id": node_id,
                "prompt_id": record.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, state in record.progress.items()
        }
        self._emit("progress_state", {"prompt_id": record.prompt_id, "nodes": nodes}, record.client_id)

    async def _run(self, record: _Prompt) -> None:
        """main.prompt_worker around PromptExecutor.execute_async: run, write history, tell."""
        self._queue_updated()  # taken from the queue
        graph, prompt_id = record.graph, record.prompt_id
        if not self.cache:
            self._cache.clear()
        signatures: dict[str, str] = {}
        for node_id in graph:
            self._signature(graph, node_id, signatures)
        used = set(signatures.values())
        self._cache = {key: entry for key, entry in self._cache.items() if key in used}
        cached = [node_id for node_id in graph if signatures[node_id] in self._cache]
        self._add_message(record, "execution_start", {"prompt_id": prompt_id})
        self._add_message(record, "execution_cached", {"nodes": cached, "prompt_id": prompt_id})
        self._bump()
        ui_outputs: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        try:
            await self._run_nodes(record, signatures, cached, ui_outputs, executed)
            self._add_message(record, "execution_success", {"prompt_id": prompt_id})
            record.outcome = "success"
        except _Interrupted:
            self.interrupts.append(prompt_id)
            message = self._failed_node(record, executed)
            self._add_message(record, "execution_interrupted", message, broadcast=True)
            record.outcome = "interrupted"
        except _NodeFailure as failure:
            message = self._failed_node(record, executed)
            current_inputs = {
                name: [f"<{value[0]}:{value[1]}>" if _is_link(value) else value]
                for name, value in graph[message["node_id"]].get("inputs", {}).items()
            }
            message.update(
                exception_message=f"{failure}\n",
                exception_type=failure.exception_type,
                traceback=list(_TRACEBACK),
                current_inputs=current_inputs,
                current_outputs=cached,
            )
            self._add_message(record, "execution_error", message)
            record.outcome = "error"
        record.node, record.state = None, "done"
        success = record.outcome == "success"
        status = {
            "status_str": "success" if success else "error",
            "completed": success,
            "messages": record.messages,
        }
        meta = {
            node_id: {
                "node_id": node_id,
                "display_node": node_id,
                "parent_node": None,
                "real_node_id": node_id,
            }
            for node_id in ui_outputs
        }
        self._history[prompt_id] = {
            "prompt": record.item(),
            "outputs": ui_outputs,
            "status": status,
            "meta": meta,
        }
        del self._running[prompt_id]
        self._queue_updated()
        if record.client_id is not None:
            self._emit("executing", {"node": None, "prompt_id": prompt_id}, record.client_id)
        self._bump()

    async def _run_nodes(
        self,
        record: _Prompt,
        signatures: dict[str, str],
        cached: list[str],
        ui_outputs: dict[str, dict[str, Any]],
        executed: list[str],
    ) -> None:
        """The nodes leading to the outputs, in ExecutionList's order (execution.execute per node)."""
        graph, sid = record.graph, record.client_id
        values = {node_id: self._cache[signatures[node_id]].values for node_id in cached}
        order = _ExecutionList(graph, set(cached))
        for output in record.outputs:
            order.add_node(output)
        while (node_id := order.pick()) is not None:
            entry = self._cache.get(signatures[node_id])
            if entry is not None:  # an output node whose inputs did not change: only `executed`
                self._executed(record, node_id, entry.ui)
                if entry.ui is not None:
                    ui_outputs[node_id] = entry.ui
                values[node_id] = entry.values
                record.progress[node_id] = {"state": "finished", "value": 1.0, "max": 1.0}
                self._progress_state(record)
                order.complete(node_id)
                continue
            record.progress[node_id] = {"state": "running", "value": 0.0, "max": 1.0}
            self._progress_state(record)
            record.node = node_id
            if sid is not None:
                self._emit(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": record.prompt_id},
                    sid,
                )
            self._bump()
            if record.interrupted:
                raise _Interrupted
            node = graph[node_id]
            inputs = {
                name: values[value[0]][value[1]] if _is_link(value) else value
                for name, value in node.get("inputs", {}).items()
            }
            try:
                result, ui = await self._execute_node(record, node_id, node["class_type"], inputs)
            except (_Interrupted, _NodeFailure):
                raise
            except Exception as exc:  # a graph the stand-in cannot make sense of, as a node would fail
                raise _NodeFailure(str(exc), type(exc).__name__) from exc
            values[node_id] = result
            if ui is not None:
                ui_outputs[node_id] = ui
                self._executed(record, node_id, ui)
            self._cache[signatures[node_id]] = _CacheEntry(result, ui)
            state = record.progress[node_id]
            state.update(state="finished", value=state["max"])
            self._progress_state(record)
            executed.append(node_id)
            order.complete(node_id)

    def _executed(self, record: _Prompt, node_id: str, output: dict[str, Any] | None) -> None:
        if record.client_id is not None:
            message = {
                "node": node_id,
                "display_node": node_id,
                "output": output,
                "prompt_id": record.prompt_id,
            }
            self._emit("executed", message, record.client_id)

    def _failed_node(self, record: _Prompt, executed: list[str]) -> dict[str, Any]:
        node_id = record.node or ""
        node_type = record.graph.get(node_id, {}).get("class_type", "")
        return {
            "prompt_id": record.prompt_id,
            "node_id": node_id,
            "node_type": node_type,
            "executed": executed,
        }

    def _failing(self, node_id: str, class_type: str) -> bool:
        if self.fail_at_node is not None:
            return node_id == self.fail_at_node
        return bool(self.fail_with) and class_type in _SAMPLER_CLASSES

    def _failure(self, node_id: str) -> _NodeFailure:
        return _NodeFailure(self.fail_with or f"stand-in failure at node {node_id}", self.fail_type)

    async def _execute_node(
        self, record: _Prompt, node_id: str, class_type: str, inputs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        failing = self._failing(node_id, class_type)
        if failing and not (class_type in _SAMPLER_CLASSES and self.fail_at_step > 0):
            raise self._failure(node_id)
        if class_type == "CheckpointLoaderSimple":
            name = inputs["ckpt_name"]
            return (_Thing("MODEL", name), _Thing("CLIP", name), _Thing("VAE", name)), None
        if class_type == "UNETLoader":
            return (_Thing("MODEL", inputs["unet_name"]),), None
        if class_type == "CLIPLoader":
            return (_Thing("CLIP", inputs["clip_name"]),), None
        if class_type == "VAELoader":
            return (_Thing("VAE", inputs["vae_name"]),), None
        if class_type == "ModelSamplingSD3":
            return (inputs["model"],), None
        if class_type == "CLIPTextEncode":
            return (_Thing("CONDITIONING", str(inputs["text"])),), None
        if class_type == "EmptyLatentImage":
            latent = _Latent(inputs["width"] // 8 * 8, inputs["height"] // 8 * 8, inputs["batch_size"])
            return (latent,), None
        if class_type == "EmptyHunyuanLatentVideo":
            frames = (inputs["length"] - 1) // 4 * 4 + 1
            latent = _Latent(
                inputs["width"] // 8 * 8, inputs["height"] // 8 * 8, frames * inputs["batch_size"]
            )
            return (latent,), None
        if class_type == "KSampler":
            return (await self._sample(record, node_id, inputs, failing),), None
        if class_type == "VAEEncode":
            pixels: _Images = inputs["pixels"]
            latent = _Latent(
                pixels.width // 8 * 8, pixels.height // 8 * 8, pixels.count, pixels.pixels, pixels.sampling
            )
            return (latent,), None
        if class_type == "VAEDecode":
            samples: _Latent = inputs["samples"]
            images = _Images(
                samples.width, samples.height, samples.count, samples.reference, samples.sampling
            )
            return (images,), None
        if class_type == "LoadImage":
            file = self._input_file(str(inputs["image"]))
            assert file is not None  # validated
            with Image.open(io.BytesIO(file.data)) as image:
                width, height = image.size
            loaded = _Images(width, height, 1, pixels=file.data)
            return (loaded, _Thing("MASK", "")), None
        if class_type == "ImageScale":
            source: _Images = inputs["image"]
            width, height = inputs["width"], inputs["height"]
            if width == 0 and height == 0:
                width, height = source.width, source.height
            elif width == 0:
                width = max(1, round(source.width * height / source.height))
            elif height == 0:
                height = max(1, round(source.height * width / source.width))
            return (replace(source, width=width, height=height),), None
        if class_type == "CreateVideo":
            return (_Video(inputs["images"], float(inputs["fps"])),), None
        if class_type in ("SaveImage", "PreviewImage"):
            return (), {"images": await self._save_images(record, class_type, inputs)}
        if class_type == "SaveVideo":
            video: _Video = inputs["video"]
            saved = await self._save_video(record, video, inputs["filename_prefix"], "output", "_.mp4")
            return (), {"images": [saved], "animated": [True]}
        if class_type == "VHS_VideoCombine":
            kind = "output" if inputs["save_output"] else "temp"
            clip = _Video(inputs["images"], float(inputs["frame_rate"]))
            saved = await self._save_video(record, clip, inputs["filename_prefix"], kind, ".mp4")
            path = posixpath.join("/ComfyUI", kind, saved["subfolder"], saved["filename"])
            entry = {
                **saved,
                "format": inputs["format"],
                "frame_rate": float(inputs["frame_rate"]),
                "workflow": saved["filename"].removesuffix(".mp4") + ".png",
                "fullpath": path,
            }
            return ((inputs["save_output"], []),), {"gifs": [entry]}
        raise _NodeFailure(f"the stand-in cannot run {class_type}", "NotImplementedError")

    async def _sample(self, record: _Prompt, node_id: str, inputs: dict[str, Any], failing: bool) -> _Latent:
        steps = int(inputs["steps"])
        latent: _Latent = inputs["latent_image"]
        sampling = _Sampling(inputs["positive"].name, inputs["negative"].name, int(inputs["seed"]), steps)
        sid = record.client_id
        for step in range(1, steps + 1):
            if self.step_s:
                await asyncio.sleep(self.step_s)
            if record.interrupted:
                raise _Interrupted  # ComfyUI checks in its progress hook, before sending
            record.progress[node_id].update(state="running", value=step, max=steps)
            self._progress_state(record)
            message = {"value": step, "max": steps, "prompt_id": record.prompt_id, "node": node_id}
            self._emit("progress", message, sid)
            if self.previews:
                self._emit_bytes(struct.pack(">II", 1, 1) + _preview_jpeg(), sid)
            record.step = step
            self._bump()
            if failing and step >= self.fail_at_step:
                raise self._failure(node_id)
            if self.hold_at_step == step:
                while not (record.released or record.interrupted):
                    await record.wake.wait()
                    record.wake.clear()
                if record.interrupted:
                    raise _Interrupted
        return replace(latent, sampling=sampling)

    def _next_counter(self, kind: str, subfolder: str, prefix: str) -> int:
        """folder_paths.get_save_image_path: one more than the highest `prefix_NNNNN` there."""
        counters = [0]
        for file_kind, file_folder, filename in self._files:
            if (file_kind, file_folder) == (kind, subfolder) and filename[: len(prefix) + 1] == f"{prefix}_":
                digits = filename[len(prefix) + 1 :].split("_")[0].split(".")[0]
                if digits.isdigit():
                    counters.append(int(digits))
        return max(counters) + 1

    def _save_path(self, prefix: str, images: _Images) -> tuple[str, str]:
        prefix = prefix.replace("%width%", str(images.width)).replace("%height%", str(images.height))
        normalized = posixpath.normpath(prefix)
        if normalized.startswith(("/", "..")):
            raise _NodeFailure(
                "**** ERROR: Saving image outside the output folder is not allowed.", "Exception"
            )
        subfolder, _, name = normalized.rpartition("/")
        return subfolder, name

    def _store(
        self, kind: str, subfolder: str, filename: str, data: bytes, content_type: str
    ) -> dict[str, str]:
        self._files[(kind, subfolder, filename)] = _File(data, content_type)
        self.files[(kind, subfolder, filename)] = data
        return {"filename": filename, "subfolder": subfolder, "type": kind}

    async def _save_images(
        self, record: _Prompt, class_type: str, inputs: dict[str, Any]
    ) -> list[dict[str, str]]:
        images: _Images = inputs["images"]
        if class_type == "PreviewImage":
            kind, letters = "temp", "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
            subfolder, prefix = "", f"ComfyUI_temp_{letters}"
        else:
            kind = "output"
            subfolder, prefix = self._save_path(str(inputs["filename_prefix"]), images)
        counter = self._next_counter(kind, subfolder, prefix)
        results = []
        for index in range(images.count):
            data = await _render_image(record.prompt_id, images, index)
            results.append(self._store(kind, subfolder, f"{prefix}_{counter:05}_.png", data, "image/png"))
            counter += 1
        return results

    async def _save_video(
        self, record: _Prompt, video: _Video, prefix: str, kind: str, suffix: str
    ) -> dict[str, str]:
        subfolder, name = self._save_path(prefix, video.images)
        counter = self._next_counter(kind, subfolder, name)
        images = video.images
        fps = max(1, round(video.fps))
        sampling = images.sampling or _Sampling("", "", 0, 1)
        job = GenerationInput(
            render_id=record.prompt_id,
            kind="video",
            prompt=sampling.prompt,
            negative_prompt=sampling.negative,
            width=images.width,
            height=images.height,
            steps=sampling.steps,
            seed=sampling.seed,
            reference=images.reference,
            duration_s=images.count / fps,
            fps=fps,
        )
        artifact = await ProceduralBackend().generate(job, _ignore_progress)
        return self._store(kind, subfolder, f"{name}_{counter:05}{suffix}", artifact.data, "video/mp4")


class _ExecutionList:
    """comfy_execution/graph.py's ExecutionList: nodes leading to the outputs, not cached, picked
    when unblocked, output nodes first, then those one or two links before an output."""

    def __init__(self, graph: dict[str, Any], cached: set[str]) -> None:
        self.graph = graph
        self.cached = cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, bool]] = {}

    def add_node(self, start: str) -> None:
        stack = [start]
        links: list[tuple[str, str]] = []
        while stack:
            node_id = stack.pop()
            if node_id in self.pending:
                continue
            self.pending[node_id] = True
            self.block_count[node_id] = 0
            self.blocking[node_id] = {}
            for value in self.graph[node_id].get("inputs", {}).values():
                if _is_link(value) and value[0] not in self.cached:
                    stack.append(value[0])
                    links.append((value[0], node_id))
        for source, target in links:
            if target not in self.blocking[source]:
                self.blocking[source][target] = True
                self.block_count[target] += 1

    def _is_output(self, node_id: str) -> bool:
        return _NODES[self.graph[node_id]["class_type"]].output

    def pick(self) -> str | None:
        ready = [node_id for node_id in self.pending if self.block_count[node_id] == 0]
        if not ready:
            return None
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(blocked) for blocked in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self.blocking[node_id]:
                if any(self._is_output(further) for further in self.blocking[blocked]):
                    return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for blocked in self.blocking.pop(node_id):
            self.block_count[blocked] -= 1


async def _render_image(prompt_id: str, images: _Images, index: int) -> bytes:
    if images.sampling is None and images.pixels is not None:
        return await asyncio.to_thread(_as_png, images.pixels, images.width, images.height)
    sampling = images.sampling or _Sampling("", "", 0, 1)
    job = GenerationInput(
        render_id=prompt_id,
        kind="image",
        prompt=sampling.prompt,
        negative_prompt=sampling.negative,
        width=images.width,
        height=images.height,
        steps=sampling.steps,
        seed=sampling.seed + index,
        reference=images.reference,
    )
    artifact = await ProceduralBackend().generate(job, _ignore_progress)
    return artifact.data


def _as_png(data: bytes, width: int, height: int) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        converted = image.convert("RGB").resize((width, height))
    buffer = io.BytesIO()
    converted.save(buffer, "PNG")
    return buffer.getvalue()


@functools.cache
def _preview_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, "JPEG")
    return buffer.getvalue()


def graph_with(workflow: Mapping[str, Any], changes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A deep copy of `workflow` with node inputs changed: `graph_with(WORKFLOW_TXT2IMG, {"5":
    {"width": 64, "height": 64}, "3": {"steps": 2}})`."""
    graph = copy.deepcopy(dict(workflow))
    for node_id, inputs in changes.items():
        graph[node_id]["inputs"].update(inputs)
    return graph


def messages_of(events: Iterable[tuple[str | None, str, Any]], prompt_id: str) -> list[str]:
    """The types of the recorded events about `prompt_id`, in order (`status` left out)."""
    return [
        kind
        for _, kind, data in events
        if isinstance(data, dict) and data.get("prompt_id") == prompt_id and kind != "status"
    ]
