//! Batches from any [`SampleSource`] (decoded images, or rows of a latent cache), in an order
//! fixed by [`Order`] and a [`Cursor`], decoded in parallel with rayon and prepared ahead by a
//! background thread into a bounded queue, so a training step finds its batch ready whenever
//! decoding keeps up.
//!
//! Determinism: a batch is the next `batch_size` usable samples from the cursor on. Whether a
//! sample is usable is itself a pure function of the sample, so skipping bad samples shifts the
//! following batches the same way in every run, however many threads decode and however far
//! ahead they run. A batch carries the cursor after its last sample (`next`); a loader started
//! from that cursor yields exactly the batches that would have followed.
//!
//! Sharded (`Loader::sharded`, one rank of a data-parallel run): a batch is this rank's run of
//! `batch_size` positions of each round of `world` runs ([`Shard`]), decoded by this rank alone,
//! and its `next` is the cursor after the whole round, the same on every rank. A bad sample
//! leaves its batch one short rather than pulling in the next position, which belongs to
//! another rank (knowing whether the others' samples are usable would mean decoding them).
//!
//! Aspect-ratio buckets (a source whose [`SampleSource::buckets`] is Some): a shuffled order is
//! a [`bucketed_permutation`](super::order::bucketed_permutation), whose every run of
//! `batch_size` positions from a multiple of `batch_size` is one bucket, and batches are those
//! runs (as a sharded stream's are, also on one process: a bad sample leaves its batch short,
//! a batch with no usable sample is passed over). Ranks take the runs round-robin as above, so
//! each micro-batch of a step is one bucket on every rank and world size. A sequential pass
//! visits its range bucket by bucket and ends a batch where the bucket changes.
use super::source::{BadKind, BadSample, OnBadSample, SampleSource};
use super::order::{Cursor, Indexer, Order, Shard};
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a loader walks its source.
#[derive(Clone, Copy, Debug)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub order: Order,
    pub on_bad_sample: OnBadSample,
    /// Batches prepared ahead of the consumer (the capacity of the queue), at least 1.
    pub prefetch: usize,
    /// Decode threads; 0 means one per core.
    pub threads: usize,
}

impl LoaderOptions {
    /// Training defaults: shuffled by `seed`, skip bad samples, two batches ahead, all cores.
    pub fn shuffled(batch_size: usize, seed: u64) -> Self {
        LoaderOptions { batch_size, order: Order::Shuffled { seed }, on_bad_sample: OnBadSample::Skip, prefetch: 2, threads: 0 }
    }
}

/// A batch and where it sits in the stream.
#[derive(Debug)]
pub struct Batch<T> {
    pub data: T,
    /// Source indices of the rows, in order.
    pub indices: Vec<usize>,
    /// The epoch each row was drawn in (decides its crop and flip).
    pub epochs: Vec<u64>,
    /// Cursor of the first position this batch looked at.
    pub start: Cursor,
    /// Cursor of the next batch: what a checkpoint saves to resume after this batch.
    pub next: Cursor,
    /// Samples skipped while filling this batch (under [`OnBadSample::Skip`]).
    pub skipped: Vec<BadSample>,
}

struct Pending<I> {
    cursor: Cursor,
    index: usize,
    result: std::result::Result<I, BadSample>,
}

/// The synchronous core of a loader: batches in order, decoding a window of samples at a time
/// in parallel. [`Loader`] runs one on a background thread.
pub struct BatchStream<S: SampleSource> {
    source: Arc<S>,
    opts: LoaderOptions,
    indexer: Indexer,
    /// Next position to decode; None once a sequential pass is exhausted.
    ahead: Option<Cursor>,
    /// Next position to hand out.
    cursor: Cursor,
    pending: VecDeque<Pending<S::Item>>,
    pool: rayon::ThreadPool,
    window: usize,
    shard: Option<Shard>,
}

impl<S: SampleSource> BatchStream<S> {
    pub fn new(source: Arc<S>, opts: LoaderOptions, start: Cursor) -> Result<Self> {
        if opts.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        if source.len() == 0 {
            bail!("{} has no samples", source.describe());
        }
        let indexer = match source.buckets() {
            Some(of) => Indexer::bucketed(opts.order, of, opts.batch_size),
            None => Indexer::new(opts.order, source.len()),
        };
        let len = indexer.len();
        if len == 0 {
            bail!(
                "no aspect-ratio bucket of {} holds a whole batch of {} samples (data.buckets, train.batch_size)",
                source.describe(),
                opts.batch_size
            );
        }
        let ahead = match opts.order {
            Order::Sequential { start: s, end } => {
                if s > end || end > len {
                    bail!("range {s}..{end} is outside the {len} samples of {}", source.describe());
                }
                if start.epoch != 0 || start.position < s as u64 || start.position > end as u64 {
                    bail!("cursor {start:?} is outside the range {s}..{end}");
                }
                (start.position < end as u64).then_some(start)
            }
            Order::Shuffled { .. } => {
                if start.position >= len as u64 {
                    bail!(
                        "cursor {start:?} is past the {len} samples of {} (was the checkpoint made with another dataset?)",
                        source.describe()
                    );
                }
                if indexer.is_bucketed() && !start.position.is_multiple_of(opts.batch_size as u64) {
                    bail!("cursor {start:?} is not at the start of a batch of {} (was the checkpoint made without data.buckets?)", opts.batch_size);
                }
                Some(start)
            }
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .thread_name(|i| format!("sdkd-decode-{i}"))
            .build()
            .context("starting the decode threads")?;
        let window = opts.batch_size.max(4 * pool.current_num_threads());
        let shard = (indexer.is_bucketed() && matches!(opts.order, Order::Shuffled { .. })).then_some(Shard { rank: 0, world: 1 });
        Ok(BatchStream { indexer, source, opts, ahead, cursor: start, pending: VecDeque::new(), pool, window, shard })
    }

    /// The stream of one rank's share (see the module comment); `start` is the first position
    /// of a round. Shuffled orders only (endless, as training reads them).
    pub fn sharded(source: Arc<S>, opts: LoaderOptions, start: Cursor, shard: Shard) -> Result<Self> {
        if !matches!(opts.order, Order::Shuffled { .. }) {
            bail!("a sharded loader walks a shuffled order");
        }
        if shard.world == 0 || shard.rank >= shard.world {
            bail!("rank {} is not one of {} ranks", shard.rank, shard.world);
        }
        let mut stream = Self::new(source, opts, start)?;
        stream.shard = Some(shard);
        Ok(stream)
    }

    /// This rank's run of the next round: its positions decoded in parallel, the bad ones
    /// skipped (not replaced), `next` after the round.
    fn next_shard_batch(&mut self, shard: Shard) -> Result<Option<Batch<S::Batch>>> {
        let len = self.indexer.len();
        let b = self.opts.batch_size;
        let mut passed_over = vec![];
        // one process passes over a batch with no usable sample (ranks cannot: the others go on)
        for _ in 0..len.div_ceil(b) {
            match self.shard_round(shard)? {
                Ok(mut batch) => {
                    passed_over.append(&mut batch.skipped);
                    batch.skipped = passed_over;
                    return Ok(Some(batch));
                }
                Err(skipped) if shard.world == 1 => passed_over.extend(skipped),
                Err(skipped) => bail!(
                    "all {b} samples of rank {}'s share of a batch of {} are unusable (the last: {}); a rank cannot train on none",
                    shard.rank,
                    self.source.describe(),
                    skipped.last().map(|s| s.to_string()).unwrap_or_default()
                ),
            }
        }
        bail!("none of the {len} samples of {} can be used; the last: {}", self.source.describe(), passed_over.last().map(|s| s.to_string()).unwrap_or_default())
    }

    /// This rank's run of the next round, or the bad samples when none of it is usable.
    fn shard_round(&mut self, shard: Shard) -> Result<std::result::Result<Batch<S::Batch>, Vec<BadSample>>> {
        let len = self.indexer.len();
        let b = self.opts.batch_size;
        let order = self.opts.order;
        let step = |c: Cursor| order.advance(c, len).expect("a shuffled order never ends");
        let start = self.cursor;
        let mut c = start;
        for _ in 0..shard.rank * b {
            c = step(c);
        }
        let mut todo = Vec::with_capacity(b.min(len)); // a hint: b comes from the user
        for _ in 0..b {
            todo.push((c, self.indexer.index(c)));
            c = step(c);
        }
        for _ in 0..(shard.world - 1 - shard.rank) * b {
            c = step(c);
        }
        self.cursor = c;
        let source = &self.source;
        let loaded: Vec<Pending<S::Item>> = self.pool.install(|| {
            todo.par_iter()
                .map(|&(cursor, index)| Pending { cursor, index, result: load_guarded(source.as_ref(), index, cursor.epoch) })
                .collect()
        });
        let (mut items, mut indices, mut epochs, mut skipped) = (vec![], vec![], vec![], vec![]);
        for p in loaded {
            match p.result {
                Ok(item) => {
                    items.push(item);
                    indices.push(p.index);
                    epochs.push(p.cursor.epoch);
                }
                Err(bad) if self.opts.on_bad_sample == OnBadSample::Fail => {
                    bail!("bad sample {bad} (on_bad_sample is fail; set it to skip to skip such samples)")
                }
                Err(bad) => skipped.push(bad),
            }
        }
        if items.is_empty() {
            return Ok(Err(skipped));
        }
        let data = self.pool.install(|| source.collate(items))?;
        Ok(Ok(Batch { data, indices, epochs, start, next: self.cursor, skipped }))
    }

    /// Decodes the next window of positions, in parallel, in order.
    fn refill(&mut self) {
        let len = self.source.len();
        let mut todo = Vec::with_capacity(self.window.min(len)); // a hint: the window comes from the user's batch size
        while todo.len() < self.window {
            let Some(c) = self.ahead else { break };
            todo.push((c, self.indexer.index(c)));
            self.ahead = self.opts.order.advance(c, len);
        }
        let source = &self.source;
        let loaded: Vec<Pending<S::Item>> = self.pool.install(|| {
            todo.par_iter()
                .map(|&(cursor, index)| Pending { cursor, index, result: load_guarded(source.as_ref(), index, cursor.epoch) })
                .collect()
        });
        self.pending.extend(loaded);
    }

    /// The next batch; None when a sequential pass is over. A bad sample under
    /// [`OnBadSample::Fail`] is an error naming its file.
    pub fn next_batch(&mut self) -> Result<Option<Batch<S::Batch>>> {
        if let Some(shard) = self.shard {
            return self.next_shard_batch(shard);
        }
        let len = self.source.len();
        let start = self.cursor;
        let (mut items, mut indices, mut epochs, mut skipped) = (vec![], vec![], vec![], vec![]);
        let mut bad_in_a_row = 0usize;
        let mut bucket = None;
        while items.len() < self.opts.batch_size {
            if self.pending.is_empty() {
                self.refill();
            }
            // a bucketed pass ends a batch where the bucket changes
            let next_bucket = self.pending.front().map(|p| self.indexer.bucket(p.index));
            if !items.is_empty() && next_bucket.is_some_and(|b| b != bucket) {
                break;
            }
            let Some(p) = self.pending.pop_front() else { break };
            self.cursor = self.opts.order.advance(p.cursor, len).unwrap_or(Cursor::new(0, p.cursor.position + 1));
            match p.result {
                Ok(item) => {
                    bad_in_a_row = 0;
                    bucket = self.indexer.bucket(p.index);
                    items.push(item);
                    indices.push(p.index);
                    epochs.push(p.cursor.epoch);
                }
                Err(bad) => {
                    if self.opts.on_bad_sample == OnBadSample::Fail {
                        bail!("bad sample {bad} (on_bad_sample is fail; set it to skip to skip such samples)");
                    }
                    bad_in_a_row += 1;
                    if bad_in_a_row >= len {
                        bail!("none of the {len} samples of {} can be used; the last: {bad}", self.source.describe());
                    }
                    skipped.push(bad);
                }
            }
        }
        if items.is_empty() {
            return Ok(None);
        }
        // Collate on the decode threads too, so `threads` bounds all the CPU the loader uses.
        let source = &self.source;
        let data = self.pool.install(|| source.collate(items))?;
        Ok(Some(Batch { data, indices, epochs, start, next: self.cursor, skipped }))
    }
}

/// Loads one sample, turning a panic inside a decoder into a bad sample rather than a crash.
fn load_guarded<S: SampleSource>(source: &S, index: usize, epoch: u64) -> std::result::Result<S::Item, BadSample> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source.load(index, epoch))) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(BadSample {
                index,
                file: format!("sample {index} of {}", source.describe()).into(),
                kind: BadKind::Corrupt,
                reason: format!("decoder failed: {msg}"),
            })
        }
    }
}

/// Counters a trainer logs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoaderStats {
    pub batches: u64,
    pub samples: u64,
    /// Bad samples skipped so far.
    pub skipped: u64,
    /// Time the consumer spent waiting for batches (0 when decoding keeps up).
    pub wait: Duration,
}

type Message<T> = Result<Option<Batch<T>>>;

/// A [`BatchStream`] on a background thread, `prefetch` batches ahead of the consumer.
pub struct Loader<S: SampleSource> {
    rx: Option<Receiver<Message<S::Batch>>>,
    worker: Option<JoinHandle<()>>,
    stats: LoaderStats,
    finished: bool,
    describe: String,
}

impl<S: SampleSource> Loader<S> {
    /// Starts producing batches from `start` (use the `next` cursor of the last batch a
    /// checkpoint saw to resume).
    pub fn new(source: Arc<S>, opts: LoaderOptions, start: Cursor) -> Result<Self> {
        let stream = BatchStream::new(source, opts, start)?;
        Self::spawn(stream, opts)
    }

    /// One rank's share of the stream ([`Shard`]), from `start`, the first position of a round.
    pub fn sharded(source: Arc<S>, opts: LoaderOptions, start: Cursor, shard: Shard) -> Result<Self> {
        let stream = BatchStream::sharded(source, opts, start, shard)?;
        Self::spawn(stream, opts)
    }

    fn spawn(mut stream: BatchStream<S>, opts: LoaderOptions) -> Result<Self> {
        let describe = stream.source.describe();
        let (tx, rx) = sync_channel::<Message<S::Batch>>(opts.prefetch.max(1));
        let worker = std::thread::Builder::new()
            .name("sdkd-data".into())
            .spawn(move || loop {
                let msg = stream.next_batch();
                let last = !matches!(msg, Ok(Some(_)));
                // A send fails only when the loader was dropped: stop quietly.
                if tx.send(msg).is_err() || last {
                    break;
                }
            })
            .context("starting the data loader thread")?;
        Ok(Loader { rx: Some(rx), worker: Some(worker), stats: LoaderStats::default(), finished: false, describe })
    }

    /// The next batch (None at the end of a sequential pass). Skipped samples are warned about
    /// on stderr and counted in [`Loader::stats`].
    pub fn next_batch(&mut self) -> Result<Option<Batch<S::Batch>>> {
        if self.finished {
            return Ok(None);
        }
        let rx = self.rx.as_ref().expect("receiver lives until drop");
        let t0 = Instant::now();
        let msg = rx.recv().map_err(|_| anyhow!("the data loader thread of {} stopped unexpectedly", self.describe));
        self.stats.wait += t0.elapsed();
        let msg = msg.and_then(|m| m);
        match &msg {
            Ok(Some(b)) => {
                for bad in &b.skipped {
                    eprintln!("warning: skipped {bad}");
                }
                self.stats.batches += 1;
                self.stats.samples += b.indices.len() as u64;
                self.stats.skipped += b.skipped.len() as u64;
            }
            _ => self.finished = true,
        }
        msg
    }

    pub fn stats(&self) -> LoaderStats {
        self.stats
    }
}

impl<S: SampleSource> Iterator for Loader<S> {
    type Item = Result<Batch<S::Batch>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

impl<S: SampleSource> Drop for Loader<S> {
    fn drop(&mut self) {
        // Closing the queue makes the worker's next send fail; it stops after its current batch.
        self.rx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// How fast a source delivers samples.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    pub samples: u64,
    pub seconds: f64,
    pub per_second: f64,
}

/// Pulls batches through a [`Loader`] until at least `samples` samples have arrived, with a
/// consumer that does nothing, and reports samples per second (decode, transform and collate).
pub fn measure_throughput<S: SampleSource>(source: Arc<S>, opts: LoaderOptions, samples: usize) -> Result<Throughput> {
    let t0 = Instant::now();
    let mut loader = Loader::new(source, opts, opts.order.first())?;
    let mut n = 0u64;
    while (n as usize) < samples {
        match loader.next_batch()? {
            Some(b) => n += b.indices.len() as u64,
            None => break,
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Throughput { samples: n, seconds, per_second: n as f64 / seconds.max(1e-9) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Numbers 0..n; multiples of `bad_every` are bad; in buckets `i % 3` when `bucketed`.
    struct Numbers {
        n: usize,
        bad_every: usize,
        bucketed: bool,
    }

    impl SampleSource for Numbers {
        type Item = (usize, u64);
        type Batch = Vec<(usize, u64)>;
        fn len(&self) -> usize {
            self.n
        }
        fn load(&self, index: usize, epoch: u64) -> std::result::Result<(usize, u64), BadSample> {
            if self.bad_every > 0 && index.is_multiple_of(self.bad_every) {
                return Err(BadSample { index, file: PathBuf::from(format!("n{index}")), kind: BadKind::Corrupt, reason: "bad".into() });
            }
            Ok((index, epoch))
        }
        fn collate(&self, items: Vec<(usize, u64)>) -> Result<Vec<(usize, u64)>> {
            Ok(items)
        }
        fn describe(&self) -> String {
            "numbers".into()
        }
        fn buckets(&self) -> Option<Arc<[Option<u32>]>> {
            self.bucketed.then(|| (0..self.n).map(|i| Some((i % 3) as u32)).collect())
        }
    }

    fn opts(batch: usize, order: Order) -> LoaderOptions {
        LoaderOptions { batch_size: batch, order, on_bad_sample: OnBadSample::Skip, prefetch: 2, threads: 2 }
    }

    #[test]
    fn shuffled_epochs_cover_everything_and_cross_over() {
        let src = Arc::new(Numbers { n: 10, bad_every: 0, bucketed: false });
        let mut l = Loader::new(src, opts(4, Order::Shuffled { seed: 1 }), Cursor::default()).unwrap();
        let batches: Vec<_> = (0..5).map(|_| l.next_batch().unwrap().unwrap()).collect();
        let first: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).take(10).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        // Batch 2 holds positions 8, 9 of epoch 0 and 0, 1 of epoch 1.
        assert_eq!(batches[2].data.iter().map(|x| x.1).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
        assert_eq!(batches[2].next, Cursor::new(1, 2));
    }

    #[test]
    fn resume_from_a_cursor_equals_running_on() {
        let src = Arc::new(Numbers { n: 13, bad_every: 3, bucketed: false });
        let o = opts(5, Order::Shuffled { seed: 9 });
        let all: Vec<_> = Loader::new(src.clone(), o, Cursor::default()).unwrap().take(8).map(|b| b.unwrap()).collect();
        let resumed: Vec<_> = Loader::new(src, o, all[3].next).unwrap().take(4).map(|b| b.unwrap()).collect();
        for (a, b) in all[4..].iter().zip(&resumed) {
            assert_eq!(a.data, b.data);
            assert_eq!(a.next, b.next);
        }
        assert!(all.iter().all(|b| b.data.iter().all(|x| x.0 % 3 != 0)));
        assert!(all.iter().map(|b| b.skipped.len()).sum::<usize>() > 0);
    }

    #[test]
    fn sequential_pass_ends_with_a_short_batch() {
        let src = Arc::new(Numbers { n: 10, bad_every: 4, bucketed: false });
        let mut l = Loader::new(src, opts(3, Order::Sequential { start: 2, end: 9 }), Cursor::new(0, 2)).unwrap();
        let mut got = vec![];
        while let Some(b) = l.next_batch().unwrap() {
            got.push(b.data.iter().map(|x| x.0).collect::<Vec<_>>());
        }
        assert_eq!(got, vec![vec![2, 3, 5], vec![6, 7]]);
        assert_eq!(l.stats().skipped, 2);
        assert!(l.next_batch().unwrap().is_none());
    }

    #[test]
    fn all_bad_is_an_error_not_a_hang() {
        let src = Arc::new(Numbers { n: 5, bad_every: 1, bucketed: false });
        let mut l = Loader::new(src, opts(2, Order::Shuffled { seed: 0 }), Cursor::default()).unwrap();
        let e = l.next_batch().unwrap_err().to_string();
        assert!(e.contains("none of the 5 samples"), "{e}");
    }

    #[test]
    fn fail_policy_names_the_sample() {
        let src = Arc::new(Numbers { n: 5, bad_every: 4, bucketed: false });
        let mut o = opts(2, Order::Sequential { start: 0, end: 5 });
        o.on_bad_sample = OnBadSample::Fail;
        let mut l = Loader::new(src, o, Cursor::new(0, 1)).unwrap();
        assert!(l.next_batch().unwrap().is_some()); // 1, 2
        assert!(l.next_batch().unwrap_err().to_string().contains("n4"));
    }

    #[test]
    fn bad_cursor_is_an_error() {
        let src = Arc::new(Numbers { n: 5, bad_every: 0, bucketed: false });
        assert!(Loader::new(src, opts(2, Order::Shuffled { seed: 0 }), Cursor::new(0, 5)).is_err());
    }

    #[test]
    fn shards_together_read_the_unsharded_stream() {
        let src = Arc::new(Numbers { n: 11, bad_every: 0, bucketed: false });
        let o = opts(3, Order::Shuffled { seed: 4 });
        let whole: Vec<_> = Loader::new(src.clone(), o, Cursor::default()).unwrap().take(6).map(|b| b.unwrap()).collect();
        let ranks: Vec<Vec<_>> = (0..2)
            .map(|rank| Loader::sharded(src.clone(), o, Cursor::default(), Shard { rank, world: 2 }).unwrap().take(3).map(|b| b.unwrap()).collect())
            .collect();
        for round in 0..3 {
            for rank in 0..2 {
                let (a, b) = (&whole[2 * round + rank], &ranks[rank][round]);
                assert_eq!(a.data, b.data, "round {round} rank {rank}");
                assert_eq!(b.next, whole[2 * round + 1].next, "every rank's cursor is the round's end");
            }
        }
        // resumed from a round's end, a rank goes on as it would have
        let resumed: Vec<_> = Loader::sharded(src.clone(), o, ranks[1][0].next, Shard { rank: 1, world: 2 }).unwrap().take(2).map(|b| b.unwrap()).collect();
        assert_eq!(resumed[1].data, ranks[1][2].data);
        // a bad sample shortens its rank's batch only
        let bad = Arc::new(Numbers { n: 11, bad_every: 5, bucketed: false });
        let shard: Vec<_> = Loader::sharded(bad, o, Cursor::default(), Shard { rank: 0, world: 2 }).unwrap().take(4).map(|b| b.unwrap()).collect();
        assert!(shard.iter().any(|b| b.data.len() < 3 && b.skipped.len() == 3 - b.data.len()));
        assert!(Loader::sharded(src, opts(3, Order::Sequential { start: 0, end: 11 }), Cursor::default(), Shard { rank: 0, world: 2 }).is_err());
    }

    #[test]
    fn bucketed_batches_keep_to_a_bucket_on_every_rank_and_resume() {
        let bucket = |b: &Batch<Vec<(usize, u64)>>| b.data.iter().map(|x| x.0 % 3).collect::<std::collections::BTreeSet<_>>().len();
        let src = Arc::new(Numbers { n: 23, bad_every: 0, bucketed: true });
        let o = opts(3, Order::Shuffled { seed: 5 });
        let whole: Vec<_> = Loader::new(src.clone(), o, Cursor::default()).unwrap().take(12).map(|b| b.unwrap()).collect();
        // buckets of 8, 8 and 7 samples: 2 + 2 + 2 batches of 3 per epoch
        assert_eq!(whole[5].next, Cursor::new(1, 0));
        assert!(whole.iter().all(|b| b.data.len() == 3 && bucket(b) == 1));
        let resumed: Vec<_> = Loader::new(src.clone(), o, whole[6].next).unwrap().take(5).map(|b| b.unwrap()).collect();
        assert!(resumed.iter().zip(&whole[7..]).all(|(a, b)| a.data == b.data && a.next == b.next));
        // two ranks: rank r takes batches r, r + 2, ...: the same batches, each one bucket
        for rank in 0..2 {
            let mine: Vec<_> = Loader::sharded(src.clone(), o, Cursor::default(), Shard { rank, world: 2 }).unwrap().take(6).map(|b| b.unwrap()).collect();
            for (round, b) in mine.iter().enumerate() {
                assert_eq!(b.data, whole[2 * round + rank].data, "rank {rank} round {round}");
                assert_eq!(b.next, whole[2 * round + 1].next);
            }
        }
        assert!(Loader::new(src.clone(), o, Cursor::new(0, 1)).is_err(), "a cursor inside a batch");
        // a bad sample shortens its batch; every batch still one bucket
        let bad = Arc::new(Numbers { n: 23, bad_every: 4, bucketed: true });
        let with_bad: Vec<_> = Loader::new(bad, o, Cursor::default()).unwrap().take(12).map(|b| b.unwrap()).collect();
        assert!(with_bad.iter().all(|b| bucket(b) == 1 && b.data.len() + b.skipped.len() >= 3));
        assert!(with_bad.iter().any(|b| b.data.len() < 3));
        // a sequential pass goes bucket by bucket, keeping every sample
        let seq: Vec<_> = Loader::new(src.clone(), opts(3, Order::Sequential { start: 0, end: 23 }), Cursor::default()).unwrap().map(|b| b.unwrap()).collect();
        let sizes: Vec<usize> = seq.iter().map(|b| b.data.len()).collect();
        assert_eq!(sizes, vec![3, 3, 2, 3, 3, 2, 3, 3, 1]);
        assert!(seq.iter().all(|b| bucket(b) == 1));
        // too few for one batch in any bucket
        assert!(Loader::new(Arc::new(Numbers { n: 5, bad_every: 0, bucketed: true }), o, Cursor::default()).is_err());
    }

    #[test]
    fn dropping_a_loader_stops_its_thread() {
        let src = Arc::new(Numbers { n: 100, bad_every: 0, bucketed: false });
        let mut l = Loader::new(src, opts(1, Order::Shuffled { seed: 0 }), Cursor::default()).unwrap();
        l.next_batch().unwrap();
        drop(l); // must not hang on a full queue
    }
}
