"""Drive a dlm guide with the real Triton client (tritonclient[grpc]): ModelMetadata, then
ModelInfer on seeded inputs. Prints JSON with the metadata shapes, the inputs and the outputs."""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

url, model = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(url)
meta = client.get_model_metadata(model, as_json=True)
shapes = {t["name"]: [int(d) for d in t["shape"]] for t in meta["inputs"] + meta["outputs"]}
_, l, d = shapes["latents"]
f = shapes["targets"][1]
rng = np.random.default_rng(0)
b = 3
latents = rng.standard_normal((b, l, d)).astype(np.float32)
timesteps = np.array([0, 700, 1999], dtype=np.int64)
targets = np.full((b, f), -1, dtype=np.int64)
targets[:, 1] = [0, 1, 2]
inputs = [
    grpcclient.InferInput("latents", list(latents.shape), "FP32"),
    grpcclient.InferInput("timesteps", list(timesteps.shape), "INT64"),
    grpcclient.InferInput("targets", list(targets.shape), "INT64"),
]
for i, a in zip(inputs, (latents, timesteps, targets)):
    i.set_data_from_numpy(a)
result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("log_prob"), grpcclient.InferRequestedOutput("grad")])
print(json.dumps({
    "platform": meta["platform"],
    "shapes": shapes,
    "latents": latents.ravel().tolist(),
    "timesteps": timesteps.tolist(),
    "targets": targets.ravel().tolist(),
    "log_prob": result.as_numpy("log_prob").tolist(),
    "grad_shape": list(result.as_numpy("grad").shape),
    "grad": result.as_numpy("grad").ravel().tolist(),
}))
