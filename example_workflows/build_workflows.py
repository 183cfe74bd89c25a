"""Writes the example workflows from one description each:

- `<name>.json`: UI format, listed by ComfyUI's template browser (thumbnail `<name>.jpg`);
- `api/<name>_api.json`: API format for the /prompt queue. A subfolder, because the browser lists every `*.json`
  directly in example_workflows/ as a template.

    python example_workflows/build_workflows.py

A workflow is a function `name -> Graph` in WORKFLOWS. The API file is the frontend's conversion of the UI file
(widget order per node is explicit here; tests/test_comfyui.py converts every UI file in the real frontend and
compares it with the shipped API file). Thumbnails are screenshots of the loaded graph:
`COMFYUI_DIR=... python tests/comfy_frontend.py thumbnails`.
"""
from __future__ import annotations

import json
import os
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
API_DIR = os.path.join(HERE, "api")
DISTILL_LORA = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
REPO = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
HUMO_REPO = "https://huggingface.co/Comfy-Org/HuMo_ComfyUI/resolve/main/split_files"
MODEL_URLS = {
    "wan2.1_i2v_480p_14B_bf16.safetensors": (f"{REPO}/diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors",
                                             "diffusion_models"),
    "wan2.1_infiniteTalk_single_fp16.safetensors": (
        f"{REPO}/model_patches/wan2.1_infiniteTalk_single_fp16.safetensors", "model_patches"),
    "wan2.1_infiniteTalk_multi_fp16.safetensors": (
        f"{REPO}/model_patches/wan2.1_infiniteTalk_multi_fp16.safetensors", "model_patches"),
    "wan_2.1_vae.safetensors": (f"{REPO}/vae/wan_2.1_vae.safetensors", "vae"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (f"{REPO}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                               "text_encoders"),
    "clip_vision_h.safetensors": (f"{REPO}/clip_vision/clip_vision_h.safetensors", "clip_vision"),
    "wav2vec2-chinese-base_fp16.safetensors": (
        "https://huggingface.co/Kijai/wav2vec2_safetensors/resolve/main/wav2vec2-chinese-base_fp16.safetensors",
        "audio_encoders"),
    DISTILL_LORA: (f"https://huggingface.co/Kijai/WanVideo_comfy/resolve/main/Lightx2v/{DISTILL_LORA}", "loras"),
    "humo_17B_fp16.safetensors": (f"{HUMO_REPO}/diffusion_models/humo_17B_fp16.safetensors", "diffusion_models"),
    "whisper_large_v3_fp16.safetensors": (f"{HUMO_REPO}/audio_encoders/whisper_large_v3_fp16.safetensors",
                                          "audio_encoders"),
}
NEGATIVE = ("bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, still, "
            "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
            "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
            "picture, messy background, three legs, many people in the background, walking backwards")
PARAMS_TO_KEEP = ("norm, bias, time_in, patch_embedding, time_, img_emb, modulation, text_embedding, adapter, add, "
                  "ref_conv, audio_proj, multitalk_audio_proj, head")

# The ComfyUI core node types used: display name (the frontend's default title) and output slots (name, type) in
# order. The pack's come from its classes.
CORE_NODES = {
    "LoadImage": ("Load Image", [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "LoadAudio": ("Load Audio", [("AUDIO", "AUDIO")]),
    "CLIPLoader": ("Load CLIP", [("CLIP", "CLIP")]),
    "CLIPTextEncode": ("CLIP Text Encode (Prompt)", [("CONDITIONING", "CONDITIONING")]),
    "CLIPVisionLoader": ("Load CLIP Vision", [("CLIP_VISION", "CLIP_VISION")]),
    "CLIPVisionEncode": ("CLIP Vision Encode", [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")]),
    "CreateVideo": ("Create Video", [("VIDEO", "VIDEO")]),
    "SaveVideo": ("Save Video", [("video", "VIDEO")]),
    "LoadVideo": ("Load Video", [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ("Get Video Components", [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT"),
                                                    ("bit_depth", "INT")]),
    "AudioConcat": ("Concatenate Audio", [("AUDIO", "AUDIO")]),
    "BatchImagesNode": ("Batch Images", [("IMAGE", "IMAGE")]),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Types of linked inputs of core nodes. A linked widget input (fps) keeps its widget value in the UI format; the
# link wins in the API format.
CORE_INPUT_TYPES = {"image": "IMAGE", "clip": "CLIP", "clip_vision": "CLIP_VISION", "images": "IMAGE",
                    "audio": "AUDIO", "fps": "FLOAT", "video": "VIDEO", "audio1": "AUDIO", "audio2": "AUDIO",
                    "images.image0": "IMAGE", "images.image1": "IMAGE"}
WIDGET_INPUTS = {"fps", "video_fps"}   # linked inputs that are widgets when unlinked


def pack_nodes() -> tuple[dict, dict]:
    """The pack's node classes and display names (the repository imported as the package `wantalk`)."""
    import sys
    sys.path.insert(0, os.path.dirname(HERE))
    from run_demo import import_pack
    pack = import_pack()[0]
    return pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS


def pack_schema(cls) -> tuple[list, dict, dict]:
    """(outputs [(name, type)], link input types {name: type}, widget defaults {name: value} in UI order)."""
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    outputs = list(zip(names, cls.RETURN_TYPES))
    links, widgets = {}, {}
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, options = value[0], (value[1] if len(value) > 1 else {})
            if isinstance(kind, list):
                widgets[name] = options.get("default", kind[0] if kind else "")
            elif kind in WIDGET_TYPES:
                widgets[name] = options.get("default")
            else:
                links[name] = kind
    return outputs, links, widgets


class Graph:
    """Nodes placed in columns; the UI sizes are estimates of what the frontend draws."""
    COLUMN_X, WIDTH, GAP = 390, 350, 40

    def __init__(self):
        self.nodes, self.notes = [], []
        self.pack, self.display_names = pack_nodes()

    def add(self, type_, widgets=None, links=None, *, column, title=None, ui_after=None, extra_height=0):
        """links: input name -> (node, output slot). ui_after: widget name -> extra UI-only values after it
        (control_after_generate, upload buttons). Pack nodes get every widget, unspecified ones at default."""
        widgets = dict(widgets or {})
        if type_ in self.pack:
            outputs, _, defaults = pack_schema(self.pack[type_])
            widgets = {name: widgets.get(name, default) for name, default in defaults.items()}
        else:
            outputs = CORE_NODES[type_][1]
        rows = max(len(links or {}), len(outputs)) + len(widgets) + sum(map(len, (ui_after or {}).values()))
        height = 40 + 24 * rows + extra_height
        y = sum(n["size"][1] + self.GAP for n in self.nodes if n["column"] == column)
        node = {"id": len(self.nodes) + 1, "type": type_, "widgets": widgets, "links": dict(links or {}),
                "outputs": outputs, "column": column, "pos": (column * self.COLUMN_X, y), "size": (self.WIDTH, height),
                "title": title, "ui_after": dict(ui_after or {})}
        self.nodes.append(node)
        return node["id"]

    def note(self, text: str, *, column: int, height: int):
        """A Markdown note (frontend only: not in the API format) at the bottom of a column."""
        y = sum(n["size"][1] + self.GAP for n in self.nodes if n["column"] == column)
        self.notes.append((text, (column * self.COLUMN_X, y), (self.WIDTH, height)))

    def title(self, node) -> str:
        """The node's title: its own, else the display name the frontend gives its type."""
        if node["title"]:
            return node["title"]
        return self.display_names.get(node["type"]) or CORE_NODES[node["type"]][0]

    def input_type(self, node, name):
        if node["type"] in self.pack:
            return pack_schema(self.pack[node["type"]])[1].get(name) or type(node["widgets"][name]).__name__.upper()
        return CORE_INPUT_TYPES[name]

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = dict(n["widgets"])
            for name, (src, slot) in n["links"].items():
                inputs[name] = [str(src), slot]
            out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": self.title(n)}}
        return out

    def ui(self) -> dict:
        links, link_id = [], 0
        outputs = {n["id"]: [{"name": name, "type": t, "links": [], "slot_index": i}
                             for i, (name, t) in enumerate(n["outputs"])] for n in self.nodes}
        nodes = []
        for order, n in enumerate(self.nodes):
            inputs = []
            for name, (src, slot) in n["links"].items():
                link_id += 1
                t = self.by_id(src)["outputs"][slot][1]
                links.append([link_id, src, slot, n["id"], len(inputs), t])
                outputs[src][slot]["links"].append(link_id)
                entry = {"name": name, "type": self.input_type(n, name), "link": link_id}
                if name in WIDGET_INPUTS:
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            values = []
            for name, value in n["widgets"].items():
                values.append(value)
                values.extend(n["ui_after"].get(name, []))
            properties = {"Node name for S&R": n["type"]}
            models = [{"name": v, "url": MODEL_URLS[v][0], "directory": MODEL_URLS[v][1]}
                      for v in n["widgets"].values() if isinstance(v, str) and v in MODEL_URLS]
            if models:
                properties["models"] = models
            node = {"id": n["id"], "type": n["type"], "pos": list(n["pos"]), "size": list(n["size"]), "flags": {},
                    "order": order, "mode": 0, "inputs": inputs, "outputs": outputs[n["id"]],
                    "properties": properties, "widgets_values": values}
            if n["title"]:
                node["title"] = n["title"]
            nodes.append(node)
        for i, (text, pos, size) in enumerate(self.notes):
            nodes.append({"id": len(self.nodes) + 1 + i, "type": "MarkdownNote", "pos": list(pos), "size": list(size),
                          "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                          "properties": {}, "widgets_values": [text], "title": "Read me",
                          "color": "#432", "bgcolor": "#653"})
        for output_list in outputs.values():
            for o in output_list:
                o["links"] = o["links"] or None
        return {"last_node_id": len(nodes), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
                "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [120, 90]}}, "version": 0.4}

    def by_id(self, node_id):
        return self.nodes[node_id - 1]


def load_image(g: Graph, title: str) -> int:
    """A Load Image node in the first column (the tiny-run input name), with its upload widget."""
    return g.add("LoadImage", {"image": "wantalk_portrait.png"}, column=0, ui_after={"image": ["image"]},
                 title=title, extra_height=260)


def load_speech(g: Graph, number: int, title: str) -> int:
    """A Load Audio node in the first column reading wantalk_speech_<number>.wav."""
    return g.add("LoadAudio", {"audio": f"wantalk_speech_{number}.wav"}, column=0, ui_after={"audio": [None, None]},
                 title=title, extra_height=30)


def text_prompts(g: Graph, prompts: list[str], *, negative: str = NEGATIVE, device: str = "default"):
    """Load CLIP (the umt5 text encoder) in the second column with one prompt node per prompt and the negative
    prompt node; returns (prompt node ids, negative node id)."""
    clip = g.add("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                "device": device}, column=1)
    positives = [g.add("CLIPTextEncode", {"text": text}, {"clip": (clip, 0)}, column=1,
                       title=f"Prompt {i + 1}" if len(prompts) > 1 else "Prompt", extra_height=80)
                 for i, text in enumerate(prompts)]
    return positives, g.add("CLIPTextEncode", {"text": negative}, {"clip": (clip, 0)}, column=1,
                            title="Negative prompt", extra_height=110)


def save_video(g: Graph, name: str, images: tuple, audio: tuple, fps: tuple):
    """Create Video and Save Video (to video/wantalk_<name>) in the last column."""
    video = g.add("CreateVideo", {"fps": 25.0, "bit_depth": 8}, {"images": images, "audio": audio, "fps": fps},
                  column=4)
    g.add("SaveVideo", {"filename_prefix": f"video/wantalk_{name}", "format": "auto", "codec": "auto"},
          {"video": (video, 0)}, column=4, extra_height=300)


# The official input handling: the size bucket nearest the start image's aspect ratio, and the sampler encoding the
# official CLIP input itself (the cropped frame, whole, at 224) from the CLIP vision model.
OFFICIAL_INPUT = {"size": "infinitetalk-480"}


def talking_graph(name: str, *, addon: str, quantization: str, prompt: str, speakers: int, sampler: dict,
                  low_vram: bool, lora: str | None = None) -> Graph:
    """The InfiniteTalk graph; sampler: widget values of the sampler (steps, shift, guidance scales). low_vram:
    encoders on the CPU, weights loaded to CPU RAM and streamed by Block Swap, resumable windows."""
    g = Graph()
    image = load_image(g, "Start image")
    audio_1 = load_speech(g, 1, "Speech (speaker 1)")
    audio_2 = None
    if speakers == 2:
        audio_2 = load_speech(g, 2, "Speech (speaker 2)")
    (positive,), negative = text_prompts(g, [prompt], device="cpu" if low_vram else "default")
    clip_vision = g.add("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"}, column=1)
    encoder = g.add("WanTalkAudioEncoderLoader", {"model": "wav2vec2-chinese-base_fp16.safetensors",
                                                  "device": "cpu" if low_vram else "main_device"}, column=2)
    embed_links = {"audio_1": (audio_1, 0), "audio_encoder": (encoder, 0)}
    if audio_2:
        embed_links["audio_2"] = (audio_2, 0)
    embeds = g.add("WanTalkAudioEmbeds", {"two_speaker_mode": "para"}, embed_links, column=2, extra_height=100)
    loader_links = {}
    if lora:
        loader_links["lora"] = (g.add("WanTalkLoraSelect", {"lora": lora, "strength": 1.0}, column=2,
                                      title="Step-distill LoRA"), 0)
    model = g.add("WanTalkModelLoader", {"model": "wan2.1_i2v_480p_14B_bf16.safetensors", "quantization": quantization,
                                         "addon_model": addon, "lora_mode": "merge",
                                         "load_device": "offload_device" if low_vram else "main_device"},
                  loader_links, column=2)
    if low_vram:
        model = g.add("WanTalkBlockSwap", {"blocks_to_swap": -1, "prefetch": 1}, {"model": (model, 0)}, column=2)
    vae = g.add("WanTalkVAELoader", {"vae_name": "wan_2.1_vae.safetensors",
                                     "precision": "bf16" if low_vram else "fp32"}, column=2)
    sampler = g.add("WanTalkInfiniteTalkSampler", {**OFFICIAL_INPUT, **sampler, "save_windows": low_vram},
                    {"model": (model, 0), "vae": (vae, 0), "audio_embeds": (embeds, 0), "positive": (positive, 0),
                     "negative": (negative, 0), "start_image": (image, 0), "clip_vision": (clip_vision, 0)},
                    column=3, ui_after={"seed": ["fixed"]})
    save_video(g, name, (sampler, 0), (sampler, 1), (sampler, 2))
    return g


def model_note(g: Graph, title: str, files: list[str], text: str):
    """The note under the sampler: where each model file goes, with its download link, then the workflow's own
    text (Markdown)."""
    lines = [f"## wantalk: {title}", "", "Put the files in ComfyUI's `models/` folders:", ""]
    for name in files:
        url, folder = MODEL_URLS[name]
        lines.append(f"- **{folder}/** [{name}]({url})")
    g.note("\n".join(lines + ["", text]), column=3, height=420)


def talk_files(addon: str = "wan2.1_infiniteTalk_single_fp16.safetensors") -> list[str]:
    """The model files of an InfiniteTalk graph with the add-on `addon`, in the order its note lists them."""
    return ["wan2.1_i2v_480p_14B_bf16.safetensors", addon, "wan_2.1_vae.safetensors",
            "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "clip_vision_h.safetensors",
            "wav2vec2-chinese-base_fp16.safetensors"]


def infinitetalk_workflow(name: str, *, addon: str, lora: str | None = None, extra: str, **graph) -> Graph:
    """An InfiniteTalk graph (talking_graph's options) with its note under the sampler."""
    g = talking_graph(name, addon=addon, lora=lora, **graph)
    model_note(g, "InfiniteTalk", talk_files(addon) + ([lora] if lora else []),
               "The video follows the whole audio (25 fps, 81-frame windows). Connect your own image and speech "
               "to the Load nodes.\n\n" + extra)
    return g


HUMO_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                 "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                 "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def humo_workflow(name: str) -> Graph:
    """HuMo-17B: text + reference image + speech (Whisper) -> video, official settings (the sampler's defaults)."""
    g = Graph()
    image = load_image(g, "Reference image")
    audio = load_speech(g, 1, "Speech")
    (positive,), negative = text_prompts(g, ["A young woman with long dark hair sits in a bright living room and "
                                             "talks to the camera, smiling, with natural head movement and "
                                             "expressive lip motion."], negative=HUMO_NEGATIVE)
    whisper = g.add("WanTalkWhisperLoader", {"model": "whisper_large_v3_fp16.safetensors"}, column=2)
    embeds = g.add("WanTalkHuMoEmbeds", {}, {"audio": (audio, 0), "whisper": (whisper, 0),
                                             "reference_images": (image, 0)}, column=2)
    model = g.add("WanTalkModelLoader", {"model": "humo_17B_fp16.safetensors", "quantization": "fp8_e4m3fn_scaled"},
                  column=2)
    vae = g.add("WanTalkVAELoader", {"vae_name": "wan_2.1_vae.safetensors"}, column=2)
    sampler = g.add("WanTalkHuMoSampler", {}, {"model": (model, 0), "vae": (vae, 0), "humo_embeds": (embeds, 0),
                                               "positive": (positive, 0), "negative": (negative, 0)},
                    column=3, ui_after={"seed": ["fixed"]})
    save_video(g, name, (sampler, 0), (sampler, 1), (sampler, 2))
    model_note(g, "HuMo 17B", ["humo_17B_fp16.safetensors", "wan_2.1_vae.safetensors",
                               "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "whisper_large_v3_fp16.safetensors"],
               "Text + reference image + speech to video. Official settings: 480x832 or 720x1280, 97 frames "
               "per window at 25 fps, UniPC 50 steps, shift 5, guidance `tia` with text 5.0 / audio 5.5 "
               "(HuMo-1.7B: 7.5 / 7.5, image 4.0). With a step-distill LoRA use guidance `audio_cfg` (2 "
               "passes) or `none` and 6-8 steps. Audio longer than 97 frames is generated in windows "
               "continued from the previous frames. Without a reference image choose guidance `ta`.\n\n"
               "fp8_e4m3fn_scaled keeps the 17B model in about 18 GB; choose disabled on 80 GB GPUs.")
    return g


def _talk_models(g: Graph, prompts: list[str]) -> dict:
    """The shared loaders of the dubbing and chained graphs: text encoder with one prompt node per prompt and the
    negative prompt, CLIP vision, wav2vec2, the InfiniteTalk model and the VAE."""
    parts = dict(zip(("prompts", "negative"), text_prompts(g, prompts)))
    parts["clip_vision"] = g.add("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"}, column=1)
    parts["encoder"] = g.add("WanTalkAudioEncoderLoader", {"model": "wav2vec2-chinese-base_fp16.safetensors"},
                             column=2)
    parts["model"] = g.add("WanTalkModelLoader", {"model": "wan2.1_i2v_480p_14B_bf16.safetensors",
                                                  "quantization": "fp8_e4m3fn_scaled",
                                                  "addon_model": "wan2.1_infiniteTalk_single_fp16.safetensors"},
                           column=2)
    parts["vae"] = g.add("WanTalkVAELoader", {"vae_name": "wan_2.1_vae.safetensors"}, column=2)
    return parts


def _talk_embeds(g: Graph, parts: dict, speech: int, title=None) -> int:
    """Audio Embeds of one speaker's speech through the graph's shared wav2vec2."""
    return g.add("WanTalkAudioEmbeds", {}, {"audio_1": (speech, 0), "audio_encoder": (parts["encoder"], 0)},
                 column=2, extra_height=100, title=title)


def _talk_sampler(g: Graph, parts: dict, prompt: int, embeds: int, start_image: tuple, *, extra_links=None,
                  title=None) -> int:
    links = {"model": (parts["model"], 0), "vae": (parts["vae"], 0), "audio_embeds": (embeds, 0),
             "positive": (parts["prompts"][prompt], 0), "negative": (parts["negative"], 0),
             "start_image": start_image, "clip_vision": (parts["clip_vision"], 0), **(extra_links or {})}
    return g.add("WanTalkInfiniteTalkSampler", {**OFFICIAL, **OFFICIAL_INPUT}, links, column=3,
                 ui_after={"seed": ["fixed"]}, title=title)


def dubbing_workflow(name: str) -> Graph:
    """Video dubbing: a video of a person plus new speech -> the same video with lips, face and body following the
    new speech (official InfiniteTalk video-to-video)."""
    g = Graph()
    loaded = g.add("LoadVideo", {"file": "wantalk_talking.mp4"}, column=0, ui_after={"file": ["image"]},
                   title="Video to dub", extra_height=260)
    components = g.add("GetVideoComponents", {}, {"video": (loaded, 0)}, column=0)
    speech = load_speech(g, 1, "New speech")
    parts = _talk_models(g, ["A person is talking to the camera, natural head movements and expressions."])
    embeds = _talk_embeds(g, parts, speech)
    sampler = _talk_sampler(g, parts, 0, embeds, (components, 0), extra_links={"video_fps": (components, 2)})
    save_video(g, name, (sampler, 0), (sampler, 1), (sampler, 2))
    model_note(g, "InfiniteTalk video dubbing", talk_files(),
               "Connect your video and the new speech. Each 81-frame window is conditioned on the video frame "
               "at its start time (the video's frame rate comes from Get Video Components) and the output "
               "follows the new speech. The speech sets the length: a shorter video holds its last frame, a "
               "longer one is cut. The output has the video's aspect ratio (size infinitetalk-480: the "
               "official bucket; infinitetalk-720 with shift 11).")
    return g


def chained_workflow(name: str) -> Graph:
    """Two samplers, one video: the second continues the first's last frames with its own prompt and speech."""
    g = Graph()
    image = load_image(g, "Start image")
    speech_1 = load_speech(g, 1, "Speech, part 1")
    speech_2 = load_speech(g, 2, "Speech, part 2")
    parts = _talk_models(g, ["A woman is talking to the camera, calm, natural head movements.",
                             "A woman is talking to the camera and smiling, lively gestures."])
    both = g.add("AudioConcat", {"direction": "after"}, {"audio1": (speech_1, 0), "audio2": (speech_2, 0)},
                 column=2, title="Speech, parts 1 + 2")
    embeds_1 = _talk_embeds(g, parts, speech_1, title="Audio Embeds, part 1")
    embeds_all = _talk_embeds(g, parts, both, title="Audio Embeds, parts 1 + 2")
    first = _talk_sampler(g, parts, 0, embeds_1, (image, 0), title="Sampler 1")
    second = _talk_sampler(g, parts, 1, embeds_all, (image, 0), extra_links={"previous_frames": (first, 0)},
                           title="Sampler 2 (continues 1)")
    frames = g.add("BatchImagesNode", {}, {"images.image0": (first, 0), "images.image1": (second, 0)}, column=4)
    audio = g.add("AudioConcat", {"direction": "after"}, {"audio1": (first, 1), "audio2": (second, 1)}, column=4)
    save_video(g, name, (frames, 0), (audio, 0), (first, 2))
    model_note(g, "InfiniteTalk, two chained samplers", talk_files(),
               "Sampler 2 continues Sampler 1's video (previous_frames: its last motion_frames frames start "
               "the first window, as inside one sampler) with another prompt and the second speech. Its "
               "audio embeds cover both parts (the continuation needs the speech under the frames it "
               "continues from); it outputs only the new frames and their audio, joined here with Batch "
               "Images and Concatenate Audio. Chain a third sampler the same way (its audio: all three "
               "parts, previous_frames: the joined video).")
    return g


OFFICIAL = {"steps": 40}   # the sampler's defaults are the official settings: shift 7, text 5, audio 4
WORKFLOWS = {  # name -> function(name) -> Graph
    "infinitetalk_single": partial(
        infinitetalk_workflow, addon="wan2.1_infiniteTalk_single_fp16.safetensors", quantization="fp8_e4m3fn_scaled",
        speakers=1, sampler=OFFICIAL, low_vram=False,
        prompt="A woman is talking to the camera, natural head movements and expressions, soft indoor light.",
        extra="fp8_e4m3fn_scaled keeps the 14B model in about 15 GB; choose disabled on 48 GB+ GPUs."),
    "multitalk_two_speakers": partial(
        infinitetalk_workflow, addon="wan2.1_infiniteTalk_multi_fp16.safetensors", quantization="fp8_e4m3fn_scaled",
        speakers=2, sampler=OFFICIAL, low_vram=False,
        prompt="Two people are having a conversation at a table, each talks in turn, natural gestures.",
        extra="Speaker 1 is the left half of the image, speaker 2 the right half. To choose the regions, paint "
              "a mask per speaker and connect them to mask_1 / mask_2 of Audio Embeds. two_speaker_mode: 'para' "
              "for two tracks on one timeline, 'add' when speaker 2 answers after speaker 1. The sampler's "
              "continuation 'multitalk' (with motion_frames 25) switches to the official MultiTalk long-video mode."),
    "infinitetalk_lowvram_fp4": partial(
        infinitetalk_workflow, addon="wan2.1_infiniteTalk_single_fp16.safetensors", quantization="fp4_scaled",
        speakers=1, sampler={"steps": 20}, low_vram=True,
        prompt="A man is talking to the camera, natural head movements and expressions.",
        extra="Low VRAM (12 GB cards): fp4 weights (about 8 GB for the 14B model) loaded to CPU RAM, WanTalk Block "
              "Swap streaming the last blocks to the GPU (blocks_to_swap -1: chosen from the free VRAM and the "
              "video size), text and audio encoders on the CPU, 20 steps, and save_windows on, so a crashed long "
              "run resumes from its last finished window. On a CPU-only machine remove the Block Swap node."),
    "infinitetalk_distill_lora": partial(
        infinitetalk_workflow, addon="wan2.1_infiniteTalk_single_fp16.safetensors",
        quantization="fp8_e4m3fn_scaled_fast", speakers=1, low_vram=False, lora=DISTILL_LORA,
        sampler={"steps": 4, "shift": 2.0, "text_scale": 1.0, "audio_scale": 2.0},
        prompt="A woman is talking to the camera, natural head movements and expressions, soft indoor light.",
        extra="Fast: the lightx2v step-distill LoRA, merged into the weights while loading (lora_mode merge, "
              "before the fp8 quantization: no cost per step), with the official InfiniteTalk README's settings: "
              "4 steps (4-8), shift 2, text scale 1, audio scale 2 (two model passes per step), about 15x faster "
              "than 40 steps with three passes. fp8_e4m3fn_scaled_fast needs an RTX 40xx / H100 or newer; choose "
              "fp8_e4m3fn_scaled on older GPUs. audio_scale 1 halves the time again (one pass, weaker lip sync)."),
    "humo_17b": humo_workflow,
    "infinitetalk_dubbing": dubbing_workflow,
    "infinitetalk_chained": chained_workflow,
}


def ui_path(name: str) -> str:
    return os.path.join(HERE, f"{name}.json")


def api_path(name: str) -> str:
    return os.path.join(API_DIR, f"{name}_api.json")


def build(name: str) -> tuple[dict, dict]:
    """(UI workflow, API workflow) of one entry of WORKFLOWS."""
    graph = WORKFLOWS[name](name)
    return graph.ui(), graph.api()


def main():
    os.makedirs(API_DIR, exist_ok=True)
    for name in WORKFLOWS:
        ui, api = build(name)
        for path, content in ((ui_path(name), ui), (api_path(name), api)):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=1, ensure_ascii=False)
                f.write("\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
