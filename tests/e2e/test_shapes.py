"""A Llama of another shape than the suite's tiny ones stays token-exact through every fast path.

Hidden size 512 changes where batched decode rows leave ``few_rows_linear`` (4 rows, not 8),
multi-query attention (one key/value head for 8 query heads) takes the grouped-query paths at their
extreme, and a 4096-token vocabulary makes an 8 MiB head: the client's greedy steps then take the
float16 quick logits. Lone, concurrent and transformers-API generations must all give
transformers' own greedy tokens.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from farmesh import DistributedInferenceClient
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.client.causal_lm import DistributedModelForCausalLM
from farmesh_core.row_matmul import few_rows_limit
from farmesh_core.split_head import MIN_WEIGHT_BYTES
from tests.helpers import hf_greedy_continuations

pytestmark = pytest.mark.timeout(300)

HIDDEN, VOCAB, NEW_TOKENS, SESSIONS = 512, 4096, 24, 5


@pytest.fixture(scope="module")
def wide_mqa(tmp_path_factory, mesh_factory):
    model_dir = make_checkpoint(
        str(tmp_path_factory.mktemp("wide-mqa-llama")), seed=3, vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=1,
    )  # fmt: skip
    return mesh_factory(model_dir, "0:2", "2:4")


@pytest.fixture(scope="module")
def prompts_and_expected(wide_mqa):
    prompts = [
        torch.randint(3, VOCAB, (1, 6 + 7 * i), generator=torch.Generator().manual_seed(i)) for i in range(SESSIONS)
    ]
    return prompts, hf_greedy_continuations(wide_mqa.model_dir, prompts, NEW_TOKENS)


def test_the_shape_takes_the_paths_it_is_meant_to_cover():
    assert few_rows_limit(HIDDEN) < SESSIONS  # a batch of all sessions goes to F.linear's GEMM
    assert HIDDEN * VOCAB * 4 >= MIN_WEIGHT_BYTES  # a head large enough for the float16 quick path


def test_lone_and_concurrent_sessions_equal_transformers(wide_mqa, prompts_and_expected):
    prompts, expected = prompts_and_expected
    with DistributedInferenceClient(wide_mqa.model_dir, wide_mqa.addrs) as client:

        def generate(prompt):
            return [int(t[0]) for t in client.generate_ids(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)]

        assert [generate(p) for p in prompts[:2]] == expected[:2]
        with ThreadPoolExecutor(SESSIONS) as pool:
            assert list(pool.map(generate, prompts)) == expected


def test_transformers_generate_takes_quick_logits_and_equals_transformers(wide_mqa, prompts_and_expected):
    prompts, expected = prompts_and_expected
    with DistributedModelForCausalLM.from_pretrained(wide_mqa.model_dir, dht_bootstrap=wide_mqa.addrs) as model:
        for prompt, want in zip(prompts[:2], expected[:2], strict=True):
            with torch.inference_mode(), model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS):
                out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            assert out[0, prompt.shape[1] :].tolist() == want
        assert model.quick_logits > 0


def test_shared_session_rows_take_one_quick_head_pass_and_equal_transformers(wide_mqa):
    """Prompts of one length started together share a session: its rows' one-token steps multiply
    through the nodes' packed weights, the client's head gives all rows' quick logits in one pass,
    and each row still gets transformers' greedy tokens."""
    prompts = [torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(50 + i)) for i in range(4)]
    expected = hf_greedy_continuations(wide_mqa.model_dir, prompts, NEW_TOKENS)
    with DistributedInferenceClient(wide_mqa.model_dir, wide_mqa.addrs, batch_window_ms=100) as client:

        def generate(prompt):
            return [int(t[0]) for t in client.generate_ids(prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS)]

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(generate, prompts)) == expected
        assert client.batcher.batched_rows >= 3  # (the first call may run alone)
        head = client.head._batcher()
        assert head.rows - head.passes >= 2 * (NEW_TOKENS - 1)  # passes of 3 or 4 rows for the shared steps
