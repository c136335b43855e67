"""Run by the tests (conftest.torch_vectors) with a PyTorch venv's python (`make peer`), never imported:
load an exported model directory the way a PyTorch user does and print its sentence vectors.

    python tests/torch_side.py EXPORT_DIR < sentences.json   # -> {"versions", "st", "auto", "prompted"}

"st": sentence-transformers' SentenceTransformer(EXPORT_DIR).encode; "auto": transformers'
AutoTokenizer + AutoModel, pooled and normalized by hand as the directory's 1_Pooling and
modules.json say; "prompted": per named prompt, st.encode(..., prompt_name=name). An item that is a
pair [a, b] is encoded as one sequence (st.encode's pairs; tokenizer(a, b) with its token types).
Nothing here imports mtl_jax.
"""

import json
import sys
from pathlib import Path

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

folder = Path(sys.argv[1])
sentences = json.load(sys.stdin)

st = SentenceTransformer(str(folder), device="cpu")
st_vectors = st.encode(sentences, batch_size=4, convert_to_numpy=True)

pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
max_length = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
tokenizer = AutoTokenizer.from_pretrained(str(folder))
model = AutoModel.from_pretrained(str(folder)).eval()
pairs = bool(sentences) and not isinstance(sentences[0], str)
texts = list(zip(*sentences)) if pairs else [sentences]
batch = tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
with torch.no_grad():
    states = model(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
if pooling["pooling_mode_cls_token"]:
    pooled = states[:, 0]
elif pooling["pooling_mode_max_tokens"]:
    pooled = states.masked_fill(mask == 0, float("-inf")).max(1).values
else:
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
modules = json.loads((folder / "modules.json").read_text())
if any(m["type"].endswith(".Normalize") for m in modules):
    pooled = torch.nn.functional.normalize(pooled, dim=-1)

prompted = {} if pairs else {n: st.encode(sentences, batch_size=4, prompt_name=n).tolist() for n in st.prompts if n}
json.dump(
    {
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "inputs": sorted(batch.keys()),
        "st": st_vectors.tolist(),
        "auto": pooled.tolist(),
        "prompted": prompted,  # encode(prompt_name=...) per prompt of config_sentence_transformers.json
    },
    sys.stdout,
)
