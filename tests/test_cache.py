"""lib.cache.ByteLRU: THE byte/entry-bounded LRU (encoder features, volumes, sessions)."""

from lib.cache import ByteLRU


def test_evicts_least_recently_used_by_bytes_and_keeps_the_newest():
    c = ByteLRU(max_bytes=10, sizeof=len)
    c.put("a", "xxxx")
    c.put("b", "xxxx")
    assert c.get("a") == "xxxx"  # a is now the most recently used
    assert c.put("c", "xxxx") == ["b"]
    assert c.keys() == ["a", "c"] and c.nbytes == 8
    assert c.peek("a") == "xxxx" and c.keys() == ["a", "c"]  # peek does not mark used
    assert c.put("big", "x" * 50) == ["a", "c"]  # larger than the whole budget: it alone stays
    assert c.keys() == ["big"] and c.nbytes == 50


def test_entry_bound_replace_and_re_measure():
    c = ByteLRU(max_items=2)
    c.put(1, [1], size=3)
    c.put(2, [2], size=3)
    assert c.put(1, [9], size=1, replace=False) == [] and c.get(1) == [1] and c.nbytes == 6  # the first stays
    value = c.get(2)
    value.append(5)
    c.put(2, value, size=7)  # stored again: measured again
    assert c.nbytes == 10 and c.keys(newest_first=True) == [2, 1]
    c.put(3, [3], size=1)
    assert 1 not in c and len(c) == 2 and c.nbytes == 8
    assert c.pop(2) == [2, 5] and c.nbytes == 1
    c.clear()
    assert len(c) == 0 and c.nbytes == 0
