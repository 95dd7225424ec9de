"""llama.cpp computes the same logits as the PyTorch model the family is trained with.

Tolerances (logits of a random tiny model with a logit standard deviation of ~1):
- llama.cpp with an F32 KV cache: max |diff| < 1e-4 (float32 rounding only);
- llama.cpp's default F16 KV cache (what the runtime uses): max |diff| < 2e-2, and the same argmax
  at every position where the top two torch logits differ by more than 0.05.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `train` extra; `make test` installs it
llama_cpp = pytest.importorskip("llama_cpp")

from cospec_local.lab.testworld.gguf_export import CharVocab, LlamaConfig  # noqa: E402
from cospec_local.lab.testworld.torch_llama import TorchLlama  # noqa: E402

GGML_TYPE_F32 = 0
TEXT = "Q: 4571+3689=?\n1+9+0=10\n7+8+1=16\nQ: count b in cabbd=?\nc0 a0 b1 b2 d2\nANSWER: 2"


def random_torch_model(tied_output, n_head_kv, seed=0):
    torch.manual_seed(seed)
    vocab = CharVocab()
    config = LlamaConfig(n_vocab=vocab.n_vocab, n_embd=64, n_layer=2, n_head=4, n_head_kv=n_head_kv,
                         n_ff=128, n_ctx=256, tied_output=tied_output)
    model = TorchLlama(config)
    with torch.no_grad():  # perturb the norm gains too, so that their export is checked
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model, vocab


def llama_cpp_logits(path, ids, f32_kv_cache):
    kv_types = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv_cache else {}
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1,
                            logits_all=True, verbose=False, **kv_types)
    model.eval(ids)
    return np.array(model.scores[: len(ids)])


@pytest.mark.parametrize("tied_output,n_head_kv", [(True, None), (False, 2)])
def test_llama_cpp_logits_match_torch(tmp_path, tied_output, n_head_kv):
    model, vocab = random_torch_model(tied_output, n_head_kv)
    path = model.export_gguf(tmp_path / "parity.gguf", vocab)
    ids = vocab.encode(TEXT)
    with torch.no_grad():
        torch_logits = model(torch.tensor([ids]))[0].double().numpy()
    assert 0.5 < torch_logits.std() < 5  # a meaningful logit scale for the tolerances above

    exact = llama_cpp_logits(path, ids, f32_kv_cache=True)
    assert np.abs(exact - torch_logits).max() < 1e-4

    default = llama_cpp_logits(path, ids, f32_kv_cache=False)
    assert np.abs(default - torch_logits).max() < 2e-2
    top_two = np.sort(torch_logits, axis=1)[:, -2:]
    clear = (top_two[:, 1] - top_two[:, 0]) > 0.05
    assert np.array_equal(default.argmax(1)[clear], torch_logits.argmax(1)[clear])


def test_parity_detects_a_wrong_rope_layout(tmp_path):
    """Guard that the test above can fail: swapping q/k to the rotate-half layout breaks parity."""
    model, vocab = random_torch_model(True, None)
    ids = vocab.encode(TEXT)
    with torch.no_grad():
        torch_logits = model(torch.tensor([ids]))[0].double().numpy()
    weights = model.numpy_weights()
    head_dim = model.config.head_dim
    # adjacent-pair rows (0,1),(2,3).. -> halves (0,h/2),(1,h/2+1).. within each head
    order = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    rows = np.concatenate([h * head_dim + order for h in range(model.config.n_head)])
    for i in range(model.config.n_layer):
        for name in (f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight"):
            weights[name] = weights[name][rows]
    from cospec_local.lab.testworld.gguf_export import write_llama_gguf

    path = write_llama_gguf(tmp_path / "permuted.gguf", weights, model.config, vocab)
    assert np.abs(llama_cpp_logits(path, ids, f32_kv_cache=True) - torch_logits).max() > 1e-2
