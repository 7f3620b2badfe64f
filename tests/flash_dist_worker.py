"""One rank of the Flash tensor-parallel tests (run by `mlx.launch -n 2`, never by pytest itself).

`python flash_dist_worker.py SPEC.json`: for every case in the spec, load the Flash model split over the group, then
write, with the router on and off, (rank 0) the fp32 logits of the encoded prompt and (every rank) the greedy tokens
of `stream_generate`, the router's line and the prompt length; then each image alone as one row of a
`batch_generate`, and the names of the parameters this rank holds.
"""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_internvl import distributed, sharding
from mlx_internvl.generate import batch_generate, stream_generate


def prompt_logits(model, processor, spec, flash: bool) -> np.ndarray:
    inputs = processor(spec["prompt"], images=spec["images"], max_tiles=spec["max_tiles"], routed=flash)
    enc = model.encode_request(inputs["input_ids"][0].tolist(), inputs["pixel_values"], flash)
    logits = model(mx.array([enc.ids]), image_features=enc.features)[0]
    return np.array(logits.astype(mx.float32))


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    group = distributed.start()
    assert group is not None and group.size == 2, "launch with mlx.launch -n 2"
    for case in spec["cases"]:
        model, processor = sharding.load(group, case["model"], dtype="float32", mode=case.get("mode"))
        runs = {}
        for flash in (True, False):
            logits = prompt_logits(model, processor, spec, flash)
            if group.is_leader:
                np.save(f"{case['out']}.logits.{flash}.npy", logits)
            out = list(stream_generate(model, processor, spec["prompt"], spec["images"], flash=flash,
                                       max_tokens=spec["max_tokens"], max_tiles=spec["max_tiles"]))
            runs[str(flash)] = dict(tokens=[r.token for r in out], router=out[-1].router,
                                    prompt_tokens=out[-1].prompt_tokens)
        batch = batch_generate(model, processor, [spec["batch_prompt"]] * len(spec["images"]), spec["images"],
                               max_tokens=spec["max_tokens"], max_tiles=spec["max_tiles"])
        runs["batch"] = dict(tokens=batch.token_ids)
        runs["params"] = [k for k, _ in tree_flatten(model.parameters())]
        with open(f"{case['out']}.{group.rank}.json", "w") as f:
            json.dump(runs, f)
    group.close()


if __name__ == "__main__":
    main(sys.argv[1])
