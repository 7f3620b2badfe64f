"""One rank of the tensor-parallel tests (run by `mlx.launch -n 2`, never by pytest itself).

`python dist_worker.py SPEC.json`: for every case in the spec, load the model split over the group, then write
(rank 0) the fp32 prompt logits with an image and (every rank) 16 greedy tokens, decoded without stopping at eos.
"""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from mlx_internvl import distributed, sharding


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    group = distributed.start()
    assert group is not None and group.size == 2, "launch with mlx.launch -n 2"
    for case in spec["cases"]:
        model, processor = sharding.load(group, case["model"], dtype=case.get("dtype"),
                                         adapter_path=case.get("adapter"), mode=case.get("mode"))
        inputs = processor(spec["prompt"], images=[spec["image"]], max_tiles=1)
        ids = inputs["input_ids"]
        logits = model(ids, pixel_values=inputs["pixel_values"])
        mx.eval(logits)
        if group.is_leader:
            np.save(case["out"] + ".logits.npy", np.array(logits[0].astype(mx.float32)))
        embeds = model.get_input_embeddings(ids, pixel_values=inputs["pixel_values"])[0]
        sampler = distributed.agree(lambda lp: mx.argmax(lp, axis=-1))
        tokens = [t for t, _ in generate_step(ids[0], model, max_tokens=16, sampler=sampler, input_embeddings=embeds)]
        with open(f"{case['out']}.tokens.{group.rank}.json", "w") as f:
            json.dump(tokens, f)
        # Only the language model's shard (and, on rank 0, the vision tower) is held.
        with open(f"{case['out']}.params.{group.rank}.json", "w") as f:
            from mlx.utils import tree_flatten

            json.dump({k: list(v.shape) for k, v in tree_flatten(model.parameters())}, f)
    group.close()


if __name__ == "__main__":
    main(sys.argv[1])
