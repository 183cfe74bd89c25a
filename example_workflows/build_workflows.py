"""Writes the example workflows in both formats from one description each:
`<name>.json` (UI format, shown in ComfyUI's template browser) and `<name>_api.json` (for the /prompt queue).

    python example_workflows/build_workflows.py

Widget order per node is given here explicitly; the real-ComfyUI test converts every UI file in the frontend,
which checks it. Thumbnails (`<name>.jpg`) are screenshots of the loaded graph (ui_to_api.py --screenshot).
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
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
}
NEGATIVE = ("bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, still, "
            "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
            "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
            "picture, messy background, three legs, many people in the background, walking backwards")
PARAMS_TO_KEEP = ("norm, bias, time_in, patch_embedding, time_, img_emb, modulation, text_embedding, adapter, add, "
                  "ref_conv, audio_proj, multitalk_audio_proj, head")

# Output slots of every node type used: name -> type, in order.
OUTPUTS = {
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "LoadAudio": [("AUDIO", "AUDIO")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "CLIPVisionLoader": [("CLIP_VISION", "CLIP_VISION")],
    "CLIPVisionEncode": [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")],
    "CreateVideo": [("VIDEO", "VIDEO")],
    "SaveVideo": [("video", "VIDEO")],
    "WanTalkModelLoader": [("model", "WANTALK_MODEL"), ("quantization_report", "STRING")],
    "WanTalkVAELoader": [("vae", "WANTALK_VAE")],
    "WanTalkAudioEncoderLoader": [("audio_encoder", "WANTALK_AUDIO_ENCODER")],
    "WanTalkAudioEmbeds": [("audio_embeds", "WANTALK_AUDIO_EMBEDS"), ("audio", "AUDIO"), ("num_frames", "INT")],
    "WanTalkInfiniteTalkSampler": [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")],
}
# Types of linked inputs. A linked widget input (fps) keeps its widget value in the UI format; the link wins in
# the API format.
INPUT_TYPES = {"image": "IMAGE", "clip": "CLIP", "clip_vision": "CLIP_VISION", "images": "IMAGE", "audio": "AUDIO",
               "fps": "FLOAT", "video": "VIDEO", "audio_1": "AUDIO", "audio_2": "AUDIO",
               "audio_encoder": "WANTALK_AUDIO_ENCODER", "model": "WANTALK_MODEL", "vae": "WANTALK_VAE",
               "audio_embeds": "WANTALK_AUDIO_EMBEDS", "positive": "CONDITIONING", "negative": "CONDITIONING",
               "start_image": "IMAGE", "clip_vision_output": "CLIP_VISION_OUTPUT"}
WIDGET_INPUTS = {"fps"}   # linked inputs that are widgets when unlinked


class Graph:
    def __init__(self):
        self.nodes = []            # dicts: id, type, title, widgets (ordered name -> value), ui_extra, links, pos

    def add(self, type_, widgets=None, links=None, *, pos, title=None, ui_after=None, size=(320, 130)):
        """links: input name -> (node, output slot). ui_after: widget name -> extra UI-only values after it
        (control_after_generate, upload buttons)."""
        node = {"id": len(self.nodes) + 1, "type": type_, "widgets": dict(widgets or {}), "links": dict(links or {}),
                "pos": pos, "size": size, "title": title, "ui_after": dict(ui_after or {})}
        self.nodes.append(node)
        return node["id"]

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = dict(n["widgets"])
            for name, (src, slot) in n["links"].items():
                inputs[name] = [str(src), slot]
            out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                                 "_meta": {"title": n["title"] or n["type"]}}
        return out

    def ui(self, notes=()) -> dict:
        links, link_id = [], 0
        outputs = {n["id"]: [{"name": name, "type": t, "links": [], "slot_index": i}
                             for i, (name, t) in enumerate(OUTPUTS[n["type"]])] for n in self.nodes}
        nodes = []
        for order, n in enumerate(self.nodes):
            inputs = []
            for name, (src, slot) in n["links"].items():
                link_id += 1
                t = OUTPUTS[self.by_id(src)["type"]][slot][1]
                links.append([link_id, src, slot, n["id"], len(inputs), t])
                outputs[src][slot]["links"].append(link_id)
                entry = {"name": name, "type": INPUT_TYPES[name], "link": link_id}
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
        for i, (text, pos, size) in enumerate(notes):
            nodes.append({"id": len(self.nodes) + 1 + i, "type": "MarkdownNote", "pos": list(pos), "size": list(size),
                          "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                          "properties": {}, "widgets_values": [text], "title": "Read me",
                          "color": "#432", "bgcolor": "#653"})
        for output_list in outputs.values():
            for o in output_list:
                o["links"] = o["links"] or None
        return {"last_node_id": len(nodes), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
                "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}

    def by_id(self, node_id):
        return self.nodes[node_id - 1]


def talking_graph(*, addon: str, quantization: str, prompt: str, speakers: int, steps: int, low_vram: bool,
                  prefix: str) -> Graph:
    g = Graph()
    image = g.add("LoadImage", {"image": "wantalk_portrait.png"}, pos=(0, 0), size=(320, 360),
                  ui_after={"image": ["image"]}, title="Start image")
    audio_1 = g.add("LoadAudio", {"audio": "wantalk_speech_1.wav"}, pos=(0, 400), ui_after={"audio": [None, None]},
                    title="Speech (speaker 1)")
    audio_2 = None
    if speakers == 2:
        audio_2 = g.add("LoadAudio", {"audio": "wantalk_speech_2.wav"}, pos=(0, 560), ui_after={"audio": [None, None]},
                        title="Speech (speaker 2)")
    clip = g.add("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                "device": "cpu" if low_vram else "default"}, pos=(360, 0))
    positive = g.add("CLIPTextEncode", {"text": prompt}, {"clip": (clip, 0)}, pos=(360, 160), size=(360, 150),
                     title="Prompt")
    negative = g.add("CLIPTextEncode", {"text": NEGATIVE}, {"clip": (clip, 0)}, pos=(360, 340), size=(360, 150),
                     title="Negative prompt")
    clip_vision = g.add("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"}, pos=(360, 520))
    clip_out = g.add("CLIPVisionEncode", {"crop": "center"}, {"clip_vision": (clip_vision, 0), "image": (image, 0)},
                     pos=(360, 640))
    encoder = g.add("WanTalkAudioEncoderLoader", {"model": "wav2vec2-chinese-base_fp16.safetensors",
                                                  "precision": "fp32", "device": "cpu" if low_vram else "main_device"},
                    pos=(760, 0))
    embed_links = {"audio_1": (audio_1, 0), "audio_encoder": (encoder, 0)}
    if audio_2:
        embed_links["audio_2"] = (audio_2, 0)
    embeds = g.add("WanTalkAudioEmbeds", {"normalize_loudness": True, "audio_scale": 1.0, "num_frames": 0,
                                          "two_speaker_mode": "para"}, embed_links, pos=(760, 160), size=(320, 200))
    model = g.add("WanTalkModelLoader", {"model": "wan2.1_i2v_480p_14B_bf16.safetensors", "base_precision": "bf16",
                                         "quantization": quantization, "attention_mode": "auto",
                                         "load_device": "main_device", "addon_model": addon,
                                         "params_to_keep": PARAMS_TO_KEEP}, pos=(760, 400), size=(320, 230))
    vae = g.add("WanTalkVAELoader", {"vae_name": "wan_2.1_vae.safetensors", "precision": "bf16"}, pos=(760, 670))
    sampler = g.add("WanTalkInfiniteTalkSampler", {
        "width": 832, "height": 480, "steps": steps, "shift": 7.0, "scheduler": "infinitetalk_euler",
        "text_scale": 5.0, "audio_scale": 4.0, "seed": 42, "frame_window": 81, "motion_frames": 9,
        "color_correction": 1.0, "max_frames": 0, "save_windows": low_vram},
        {"model": (model, 0), "vae": (vae, 0), "audio_embeds": (embeds, 0), "positive": (positive, 0),
         "negative": (negative, 0), "start_image": (image, 0), "clip_vision_output": (clip_out, 0)},
        pos=(1120, 0), size=(340, 520), ui_after={"seed": ["fixed"]})
    video = g.add("CreateVideo", {"fps": 25.0, "bit_depth": 8}, {"images": (sampler, 0), "audio": (sampler, 1), "fps": (sampler, 2)},
                  pos=(1500, 0), size=(270, 100))
    g.add("SaveVideo", {"filename_prefix": f"video/{prefix}", "format": "auto", "codec": "auto"}, {"video": (video, 0)},
          pos=(1500, 140), size=(400, 420))
    return g


def model_note(addon: str, extra: str) -> str:
    lines = ["## wantalk: InfiniteTalk", "", "Put the files in ComfyUI's `models/` folders:", ""]
    for name in ("wan2.1_i2v_480p_14B_bf16.safetensors", addon, "wan_2.1_vae.safetensors",
                 "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "clip_vision_h.safetensors",
                 "wav2vec2-chinese-base_fp16.safetensors"):
        url, folder = MODEL_URLS[name]
        lines.append(f"- **{folder}/** [{name}]({url})")
    lines += ["", "The video follows the whole audio (25 fps, 81-frame windows). Connect your own image and speech "
              "to the Load nodes.", "", extra]
    return "\n".join(lines)


WORKFLOWS = {
    "infinitetalk_single": dict(
        addon="wan2.1_infiniteTalk_single_fp16.safetensors", quantization="fp8_e4m3fn_scaled", speakers=1, steps=40,
        low_vram=False, prompt="A woman is talking to the camera, natural head movements and expressions, "
                               "soft indoor light.",
        extra="fp8_e4m3fn_scaled keeps the 14B model in about 15 GB; choose disabled on 48 GB+ GPUs."),
    "multitalk_two_speakers": dict(
        addon="wan2.1_infiniteTalk_multi_fp16.safetensors", quantization="fp8_e4m3fn_scaled", speakers=2, steps=40,
        low_vram=False, prompt="Two people are having a conversation at a table, each talks in turn, natural "
                               "gestures.",
        extra="Speaker 1 is the left half of the image, speaker 2 the right half. To choose the regions, paint "
              "a mask per speaker and connect them to mask_1 / mask_2 of Audio Embeds. two_speaker_mode: 'para' "
              "for two tracks on one timeline, 'add' when speaker 2 answers after speaker 1."),
    "infinitetalk_lowvram_fp4": dict(
        addon="wan2.1_infiniteTalk_single_fp16.safetensors", quantization="fp4_scaled", speakers=1, steps=20,
        low_vram=True, prompt="A man is talking to the camera, natural head movements and expressions.",
        extra="Low VRAM: fp4 weights (about 8 GB for the 14B model), text and audio encoders on the CPU, 20 steps, "
              "and save_windows on, so a crashed long run resumes from its last finished window."),
}


def main():
    for name, spec in WORKFLOWS.items():
        extra = spec.pop("extra")
        graph = talking_graph(prefix=f"wantalk_{name}", **spec)
        note = (model_note(spec["addon"], extra), (0, 720 if spec["speakers"] == 2 else 560), (340, 420))
        with open(os.path.join(HERE, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(graph.ui(notes=[note]), f, indent=1)
        with open(os.path.join(HERE, f"{name}_api.json"), "w", encoding="utf-8") as f:
            json.dump(graph.api(), f, indent=1)
        print("wrote", name)


if __name__ == "__main__":
    main()
