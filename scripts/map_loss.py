"""Is a lagging region out of the model's distribution? Its loss under AsynDM-shaped maps.

Issue 12's explanation (a): a model trained on one shared timestep per image sees
AsynDM's maps (objects noisier than their background) out of its distribution. This
measures it directly, without sampling. For training batches of the shapes world whose
timestep maps are AsynDM-shaped (`asyndm.shapes.timestep_maps`, kind ``asyndm``: a step
of a 20-step run, k in [0.1, 0.7], objects lagging at the attention's 8x8 grid), the model
predicts v three times from the same image and noise:

* ``map``: the asynchronous map itself;
* ``sync_bg``: every pixel at the background's level;
* ``sync_obj``: every pixel at the objects' level.

Per image, the v-prediction MSE of the *object* cells under ``map`` is compared with
theirs under ``sync_obj`` (same level, same noise, only the surroundings differ), and the
background cells' under ``map`` with theirs under ``sync_bg``. A model that handles maps
as well as shared levels shows differences near zero. Images whose two levels are equal
(the last step) are skipped. Paired differences: mean and a normal 95 % interval over
images.

    python scripts/map_loss.py --batches 8 --batch-size 64
    python scripts/map_loss.py --model runs/async/model
"""

from __future__ import annotations

import argparse
import math

import torch

from asyndm.adapters.unet import PerPixelTimestep
from asyndm.loading import load_pipeline
from asyndm.shapes.model import pixels_to_latents
from asyndm.shapes.timestep_maps import MapMixture, noisy_and_velocity, region_trajectories
from asyndm.shapes.train import make_batch, world_source


def _ci(x: torch.Tensor) -> str:
    half = 1.96 * x.std().item() / math.sqrt(len(x))
    return f"{x.mean().item():+.4f} [{x.mean().item() - half:+.4f}, {x.mean().item() + half:+.4f}]"


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=12345, help="data seed (not the training's 0)")
    args = p.parse_args(argv)
    pipe = load_pipeline(args.model, progress=False)
    unet, text, sched = pipe.unet, pipe.text_encoder, pipe.scheduler
    mixture = MapMixture(0, 1, 0)
    maps = (mixture, region_trajectories(sched, mixture)[1])
    source = world_source()
    rows = {"obj_map": [], "obj_sync": [], "bg_map": [], "bg_sync": []}
    with PerPixelTimestep(unet, sched.config.num_train_timesteps):
        for step in range(args.batches):
            b = make_batch(source, pipe.tokenizer, args.seed, step, args.batch_size, 0.0,
                           maps=maps)
            z0 = pixels_to_latents(b.pixels)  # (B, 12, 16, 16)
            ctx = text(b.input_ids).last_hidden_state  # (B, L, D)
            t_map = b.timesteps  # (B, 16, 16)
            lo = t_map.amin(dim=(1, 2))  # (B,) background level
            hi = t_map.amax(dim=(1, 2))  # (B,) object level
            lag = t_map > lo[:, None, None]  # (B, 16, 16) object cells

            def err(t):  # (B, 16, 16) per-pixel v MSE at the map ``t``
                z_t, v = noisy_and_velocity(z0, b.noise, t, sched.alphas_cumprod)
                return (unet(z_t, t, encoder_hidden_states=ctx).sample - v).square().mean(1)

            e_map = err(t_map)
            e_bg = err(lo[:, None, None].expand_as(t_map).contiguous())
            e_obj = err(hi[:, None, None].expand_as(t_map).contiguous())
            keep = hi > lo
            for i in keep.nonzero()[:, 0].tolist():
                m = lag[i]
                rows["obj_map"].append(e_map[i][m].mean())
                rows["obj_sync"].append(e_obj[i][m].mean())
                rows["bg_map"].append(e_map[i][~m].mean())
                rows["bg_sync"].append(e_bg[i][~m].mean())
    r = {k: torch.stack(v) for k, v in rows.items()}
    n = len(r["obj_map"])
    print(f"model: {args.model or 'embedded (shipped)'}; {n} images with a lag, "
          f"seed {args.seed}, {args.batches} x {args.batch_size}")
    print("| cells | MSE under the map | MSE synchronous at the same level | map - sync (95 % CI) |")
    print("|---|---:|---:|---|")
    for cells, a, s in (("objects", "obj_map", "obj_sync"), ("background", "bg_map", "bg_sync")):
        print(f"| {cells} | {r[a].mean():.4f} | {r[s].mean():.4f} | {_ci(r[a] - r[s])} |")


if __name__ == "__main__":
    main()
