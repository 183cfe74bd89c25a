"""The long-video loop against an independent re-implementation of the official InfiniteTalk loop
(MeiGen-AI/InfiniteTalk `wan/multitalk.py`, `generate_infinitetalk`), on tiny weights with identical noise, over
three windows, for an image and for a video (dubbing) as the condition.

The reference below follows the official loop's own variables (`audio_start_idx`, `is_first_clip`,
`cur_motion_frames_num`, `arrive_last_frame`, the one-time flipped audio padding, `extract_specific_frames`
clamped to the last frame, `y` from the reference frame plus zeros with the 4-channel mask built by
repeat/view/transpose, the motion latents pinned before every step and after every update, its float32 times and
`latent + (-v) * dt` update, the colour reference taken once from the first frame). What it shares with the pack
is the model side only: the DiT forward, the audio projection, the VAE, the colour transfer and a stand-in CLIP.

One deliberate difference is mirrored here: the pack feeds each window the motion frames as stored uint8 frames
(so resumed and chained runs equal uninterrupted ones), where the official code keeps them as floats."""
import numpy as np
import pytest
import torch

from wantalk.multitalk.color_match import match_colors
from wantalk.multitalk.conditioning import audio_conditioning, zero_audio_conditioning
from wantalk.multitalk.long_video import LongVideoSettings, TalkAudio, generate_long_video
from wantalk.wanvideo.sampling import Conditioning
from talk_inputs import stand_in_clip, tiny_talk_parts

FRAME_NUM, MOTION_FRAME, STEPS, SHIFT = 9, 5, 2, 7.0
TEXT_SCALE, AUDIO_SCALE, COLOUR = 2.0, 3.0, 0.5


@pytest.fixture(scope="module")
def parts():
    return tiny_talk_parts(11)


def official_times(steps, shift):
    """`timesteps` of generate_infinitetalk: float32 linspace(1000, 1) + [0], each through timestep_transform."""
    out = []
    for t in list(np.linspace(1000, 1, steps, dtype=np.float32)) + [0.0]:
        t = torch.tensor([t], dtype=torch.float32) / 1000
        out.append(shift * t / (1 + (shift - 1) * t) * 1000)
    return out


def official_loop(model, vae, video, fps_frames, audio, text, encode_clip, noises, max_frames_num):
    """generate_infinitetalk's window loop; video: list of [3, H, W] in [-1, 1] (a one-frame list for an image)."""
    def extract_specific_frames(frame_id):
        return video[frame_id] if frame_id < len(video) else video[-1]

    full_audio_emb = audio.clone()
    cond_image = extract_specific_frames(0)[None, :, None]             # 1 C 1 H W
    original_color_reference = cond_image.clone()
    h, w = cond_image.shape[-2:]
    lat_h, lat_w = h // 8, w // 8
    indices = torch.arange(2 * 2 + 1) - 2
    clip_length = FRAME_NUM
    is_first_clip, arrive_last_frame = True, False
    cur_motion_frames_num = 1
    audio_start_idx = 0
    audio_end_idx = audio_start_idx + clip_length
    gen_video_list, miss_lengths, window = [], [], 0
    times = official_times(STEPS, SHIFT)
    null_audio = zero_audio_conditioning(model, FRAME_NUM)
    while True:
        center_indices = torch.arange(audio_start_idx, audio_end_idx, 1).unsqueeze(1) + indices.unsqueeze(0)
        center_indices = torch.clamp(center_indices, min=0, max=full_audio_emb.shape[0] - 1)
        audio_emb = full_audio_emb[center_indices][None]
        noise = noises[window].reshape(16, (FRAME_NUM - 1) // 4 + 1, lat_h, lat_w)
        msk = torch.ones(1, FRAME_NUM, lat_h, lat_w)
        msk[:, 1:] = 0
        msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
        msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)
        clip_context = encode_clip(cond_image[0, :, -1])
        video_frames = torch.zeros(1, 3, FRAME_NUM - cond_image.shape[2], h, w)
        y = vae.encode(torch.concat([cond_image, video_frames], dim=2))
        cur_motion_frames_latent_num = int(1 + (cur_motion_frames_num - 1) // 4)
        latent_motion_frames = vae.encode(cond_image if is_first_clip else cond_frame)[0]
        y = torch.concat([msk, y], dim=1)
        audio_c = audio_conditioning(model, audio_emb[0])
        latent = noise.clone()
        for i in range(len(times) - 1):
            timestep = times[i]
            latent[:, :cur_motion_frames_latent_num] = latent_motion_frames
            x = latent[None]
            cond = model.forward_batched(x, timestep, text.context, clip_context, y, audio=audio_c)[0]
            drop_text = model.forward_batched(x, timestep, text.negative_context, clip_context, y, audio=audio_c)[0]
            uncond = model.forward_batched(x, timestep, text.negative_context, clip_context, y, audio=null_audio)[0]
            noise_pred = uncond + TEXT_SCALE * (cond - drop_text) + AUDIO_SCALE * (drop_text - uncond)
            noise_pred = -noise_pred
            dt = (times[i] - times[i + 1]) / 1000
            latent = latent + noise_pred * dt[:, None, None, None]
            latent[:, :cur_motion_frames_latent_num] = latent_motion_frames
        videos = vae.decode(latent[None])
        frames01 = ((videos[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
        reference01 = ((original_color_reference[0, :, 0].permute(1, 2, 0) + 1) / 2).clamp(0, 1)
        frames01 = match_colors(frames01, reference01, COLOUR)
        # the pack's one difference: frames are kept (and continued from) as uint8
        frames01 = (frames01 * 255).round().clamp(0, 255) / 255
        gen_video_list.append(frames01 if is_first_clip else frames01[cur_motion_frames_num:])
        if arrive_last_frame:
            break
        is_first_clip = False
        cur_motion_frames_num = MOTION_FRAME
        cond_frame = (frames01[-cur_motion_frames_num:] * 2 - 1).permute(3, 0, 1, 2)[None]
        audio_start_idx += FRAME_NUM - cur_motion_frames_num
        audio_end_idx = audio_start_idx + clip_length
        cond_image = extract_specific_frames(fps_frames(audio_start_idx))[None, :, None]
        if audio_end_idx >= min(max_frames_num, len(full_audio_emb)):
            arrive_last_frame = True
            if audio_end_idx >= len(full_audio_emb):
                miss_length = audio_end_idx - len(full_audio_emb) + 3
                full_audio_emb = torch.cat([full_audio_emb, torch.flip(full_audio_emb[-miss_length:], dims=[0])])
                miss_lengths.append(miss_length)
        if max_frames_num <= FRAME_NUM:
            break
        window += 1
    samples = torch.cat(gen_video_list)[:int(max_frames_num)]
    if max_frames_num > FRAME_NUM and sum(miss_lengths) > 0:
        samples = samples[:audio.shape[0]]
    return samples


def frame_at_time(fps, count):
    """Video frame shown at the audio frame's time (the official indexes a 25 fps video by the audio index):
    the last frame whose timestamp is not after start / 25."""
    stamps = np.arange(count) / fps
    return lambda start: int(np.searchsorted(stamps, start / 25 + 1e-9, side="right") - 1)


@pytest.mark.parametrize("condition,count,fps", [("image", 1, 25.0), ("video", 7, 25.0), ("video", 9, 30.0),
                                                 ("video", 5, 12.5)])
def test_loop_matches_the_official_loop(parts, rng, condition, count, fps):
    """Windows at 0, 4, 8 (the last reaches the audio's end); the 25 fps video of 7 frames ends before the last
    window's start (its last frame is used), the 30 and 12.5 fps videos are read at the windows' times."""
    model, vae = parts
    frames = 17
    video = [torch.rand(3, 32, 32, generator=rng) * 2 - 1 for _ in range(count)]
    audio = torch.randn(frames, 2, 16, generator=rng)
    text = Conditioning(torch.randn(1, 5, 64, generator=rng), torch.randn(1, 3, 64, generator=rng))
    encode_clip = stand_in_clip(rng)
    noises = [torch.randn(1, 16, 3, 4, 4, generator=rng) for _ in range(3)]
    settings = LongVideoSettings(frame_window=FRAME_NUM, motion_frames=MOTION_FRAME, steps=STEPS, shift=SHIFT,
                                 text_scale=TEXT_SCALE, audio_scale=AUDIO_SCALE, color_correction=COLOUR)
    calls = []

    def noise(index, shape):
        calls.append(index)
        return noises[index].clone()

    ours = generate_long_video(model, vae, torch.stack(video), TalkAudio([audio]), text, settings, fps=fps,
                               encode_clip=encode_clip, noise=noise)
    reference = official_loop(model, vae, video, frame_at_time(fps, count), audio, text, encode_clip, noises, 1000)
    assert calls == [0, 1, 2]
    assert ours.shape == reference.shape == (frames, 32, 32, 3)
    assert torch.equal(ours, reference)
    if condition == "image":   # the comparison can fail: another noise gives another video
        other = generate_long_video(model, vae, torch.stack(video), TalkAudio([audio]), text, settings, fps=fps,
                                    encode_clip=encode_clip, noise=lambda i, shape: -noises[i])
        assert (other - reference).abs().max() > 10 / 255
