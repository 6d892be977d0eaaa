/// The documents an anti-entropy round syncs past its cap are a uniform choice: over many
/// rounds every document is chosen about equally often, the last in id order as often as the
/// first (a sample that kept the front of the list starved the rest).
#[test]
fn capped_anti_entropy_rounds_choose_every_document_alike() {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut chosen = [0u32; 1000];
    for _ in 0..200 {
        let sample = super::sample_sorted(&mut rng, (0..1000usize).collect(), 100);
        assert_eq!(sample.len(), 100);
        assert!(sample.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        for i in sample {
            chosen[i] += 1;
        }
    }
    // 200 rounds of 100 of 1,000: each document about 20 times.
    let (front, back) = (chosen[..100].iter().sum::<u32>(), chosen[900..].iter().sum::<u32>());
    assert!((1_500..2_500).contains(&front), "first hundred chosen {front} times");
    assert!((1_500..2_500).contains(&back), "last hundred chosen {back} times");
    assert!(chosen.iter().all(|c| *c > 0), "every document chosen at least once");
    assert_eq!(super::sample_sorted(&mut rng, vec![3, 1, 2], 5), vec![3, 1, 2], "under the cap: all, as given");
}
