"""The RWKV World tokenizer against the vectors of spec §9."""
import pytest

from rwkv_deploy.runtime.tokenizer import world_vocab_path

VECTORS = {
    "The Eiffel tower is in the city of": [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706],
    "Hello world": [33155, 40213],
    "User: hi\n\nAssistant:": [24281, 59, 4571, 261, 5585, 41693, 59],
    "我们发现": [12605, 10402, 10997, 14446],
}




@pytest.mark.parametrize("text", VECTORS)
def test_world_vectors(world, text):
    assert world.encode(text) == VECTORS[text]
    assert world.decode(VECTORS[text]) == text


def test_world_matches_official_trie_tokenizer(world):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    official = TRIE_TOKENIZER(str(world_vocab_path()))
    text = "Ünïcödé, emoji 🤖, tabs\t\tand  spaces; 数学 and bytes \x00\x7f end"
    assert world.encode(text) == official.encode(text)
    assert world.vocab_size == 65530
