import numpy as np

from medgen.sim.baselines import METHODS, compute_baselines, format_table, masked_scores


def test_masked_scores_match_definitions():
    rng = np.random.default_rng(0)
    target = rng.random((32, 32))
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    psnr, ssim = masked_scores(target, target, mask)
    assert psnr > 100 and ssim == 1.0
    shifted = target + 0.1  # MSE 0.01 everywhere -> 20 dB
    assert abs(masked_scores(shifted, target, mask)[0] - 20.0) < 1e-6


def test_baselines_rank_as_the_physics_implies(built):
    results = compute_baselines(built.root, split="test")
    assert set(results) == {"B", "C", "D"}
    assert all(set(row) == set(METHODS) for row in results.values())
    # the real X scan of the same anatomy is closer to the clean X than any A image
    # (D's strong per-scan bias field keeps its margin small at 32 px)
    for target in "BCD":
        best_a = max(results[target][m][1] for m in METHODS if m != "noisy-X-scan")
        assert results[target]["noisy-X-scan"][1] > best_a
    assert results["C"]["noisy-X-scan"][0] > results["C"]["identity"][0] + 3
    # T2 and PD flip T1's contrast: negating before matching beats plain matching at C
    # and D, while at B (also T1w) plain matching is the better of the two
    for target in "CD":
        assert results[target]["inv-hist-match"][1] > results[target]["hist-match"][1] + 0.2
    assert results["B"]["hist-match"][1] > results["B"]["inv-hist-match"][1] + 0.2
    assert "identity" in format_table(results)
