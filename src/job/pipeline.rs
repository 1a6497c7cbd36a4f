//! The job's threads and the bounded channels between them:
//!
//! ```text
//! reader ──inputs──▶ decode pool (--jobs) ──decoded──▶ grouper ──groups──▶ workers (1/device)
//!                                                        │                     │
//!                                                        │ error lines         ▼ explained
//!                                                        └──────▶ committer ◀── write pool
//! ```
//!
//! Every channel is bounded, so a slow stage holds the ones before it back (memory stays flat
//! however many inputs there are). The grouper puts decoded images back in input order before
//! grouping them, so which images share a group (and so every batch a device runs) depends only on
//! the inputs, never on thread timing: the maps are the same with one device or eight, with one
//! decode thread or sixteen. Groups go to whichever worker is free.
//!
//! Shutdown: when the committer meets a fatal error it raises `stop` and drops its receiver; each
//! stage then finds its next send refused and ends, back to the reader.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::inputs::{with_suffix, Input, Inputs};
use super::outputs::OutputTree;
use super::profile::{HostStage, Profile};
use super::progress::{Progress, Snapshot};
use super::results::{DoneSet, LineContext, MapFiles, ResultsLog, RESULTS_FILE};
use super::{run_id, JobOptions, ModelInfo, Save, Summary, Verbosity, Worker};
use crate::cam::{Explanation, Targets};
use crate::error::{Error, Result};
use crate::image as img;
use crate::trace;

/// Result lines are committed (one sync, one append) at least this often...
const COMMIT_EVERY: Duration = Duration::from_secs(2);
/// ...and after this many images, whichever comes first.
const COMMIT_IMAGES: usize = 64;

/// An input on its way through the decode pool.
struct Decoded {
    seq: u64,
    input: Input,
    rgb: Result<Vec<u8>>,
}

/// A decoded image ready to explain.
struct Ready {
    input: Input,
    rgb: Vec<u8>,
    targets: Targets,
}

/// An explained image on its way to the write pool.
struct Explained {
    input: Input,
    rgb: Vec<u8>,
    ex: Explanation,
    ms: f64,
    device: Arc<str>,
}

/// What the committer receives.
enum Commit {
    /// An image's files are in place; its lines wait for the next commit.
    Done {
        lines: Vec<String>,
        files: Vec<PathBuf>,
    },
    /// An input failed: its error line, and the message for stderr.
    Failed { line: String, msg: String },
    /// The job cannot go on.
    Fatal(Error),
}

/// State shared by every thread of the job.
struct Shared<'a> {
    opts: &'a JobOptions,
    model: &'a ModelInfo,
    ctx: LineContext,
    tree: &'a OutputTree,
    profile: Profile,
    stop: AtomicBool,
    /// Inputs this shard handles (after the resume filter); final once `listed` is set.
    queued: AtomicU64,
    skipped: AtomicU64,
    listed: AtomicBool,
    workers_alive: AtomicUsize,
}

impl Shared<'_> {
    fn failed(&self, input: &Input, e: &Error) -> Commit {
        Commit::Failed {
            line: self.ctx.error_line(&input.path, input.rel.as_deref(), e),
            msg: format!("error: {}", crate::error::one_line(&e.to_string())),
        }
    }
}

pub fn run(
    mut workers: Vec<Box<dyn Worker>>,
    model: super::ModelInfo,
    opts: &JobOptions,
) -> Result<Summary> {
    if workers.is_empty() {
        return Err(Error::Invalid("a job needs at least one worker".into()));
    }
    let run = run_id();
    let quiet = opts.verbosity == Verbosity::Quiet;
    let notice = |msg: String| {
        if !quiet {
            eprintln!("notice: {msg}");
        }
    };
    // A manifest that cannot be opened fails here, before anything is created.
    let mut inputs = Inputs::open(&opts.source, opts.root.clone())?;

    // From here on the output directory exists.
    let tree = OutputTree::create(&opts.out_dir, &opts.root, &run)?;
    if tree.stale_removed > 0 {
        notice(format!(
            "removed the temporary files of {} run(s) that did not finish",
            tree.stale_removed
        ));
    }
    inputs.skip_dir(&opts.out_dir);
    let mut log = ResultsLog::open(&opts.out_dir.join(RESULTS_FILE))?;
    let done = if opts.resume {
        let d = DoneSet::load(&opts.out_dir, &opts.saves)?;
        notice(format!(
            "--resume: {} input(s) already explained in {}",
            d.len(),
            opts.out_dir.display()
        ));
        d
    } else {
        DoneSet::default()
    };

    let shared = Shared {
        opts,
        model: &model,
        ctx: LineContext {
            run: run.clone(),
            shard: (!opts.shard.is_all()).then(|| opts.shard.to_string()),
            mode: model.mode,
            method: model.method,
            layer: model.layer.clone(),
            precision: model.precision,
            labels: model.labels.clone(),
        },
        tree: &tree,
        profile: Profile::default(),
        stop: AtomicBool::new(false),
        queued: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        listed: AtomicBool::new(false),
        workers_alive: AtomicUsize::new(workers.len()),
    };
    let devices: Vec<String> = workers.iter().map(|w| w.name()).collect();
    let gpu = devices.iter().any(|d| d.starts_with("cuda"));
    let slow = workers.iter().any(|w| w.is_slow());
    let counters: Vec<_> = workers.iter_mut().map(|w| w.pass_counter()).collect();
    if opts.profile {
        workers.iter_mut().for_each(|w| w.set_profiling(true));
    }

    let jobs = opts.jobs.max(1);
    let batch = opts.image_batch.max(1);
    let (input_tx, input_rx) = bounded::<(u64, Input)>(jobs * 4);
    let (decoded_tx, decoded_rx) = bounded::<Decoded>(jobs * 4);
    let (group_tx, group_rx) = bounded::<Vec<Ready>>(workers.len() * 2);
    let (explained_tx, explained_rx) = bounded::<Explained>(jobs * 2 + batch * workers.len());
    let (commit_tx, commit_rx) = bounded::<Commit>(1024);

    let start = Instant::now();
    let mut summary = Summary {
        run,
        ..Summary::default()
    };
    std::thread::scope(|sc| {
        let sh = &shared;
        let done = &done;
        sc.spawn(move || read(sh, inputs, done, input_tx));
        for i in 0..jobs {
            let (rx, tx) = (input_rx.clone(), decoded_tx.clone());
            sc.spawn(move || decode(sh, i, rx, tx));
        }
        drop((input_rx, decoded_tx));
        {
            let commit_tx = commit_tx.clone();
            sc.spawn(move || group(sh, decoded_rx, group_tx, commit_tx));
        }
        for w in workers {
            let (rx, tx, ctx) = (group_rx.clone(), explained_tx.clone(), commit_tx.clone());
            sc.spawn(move || work(sh, w, rx, tx, ctx));
        }
        drop((group_rx, explained_tx));
        for i in 0..jobs {
            let (rx, tx) = (explained_rx.clone(), commit_tx.clone());
            sc.spawn(move || write(sh, i, rx, tx));
        }
        drop((explained_rx, commit_tx));

        let mut progress = Progress::new(opts.verbosity, slow, opts.log_every);
        commit(
            sh,
            &mut log,
            commit_rx,
            &mut progress,
            &counters,
            &mut summary,
        );
        progress.finish();
        // Whatever ended the commit loop, nothing upstream may wait on it any longer.
        shared.stop.store(true, Ordering::Relaxed);
    });
    summary.skipped = shared.skipped.load(Ordering::Relaxed);
    summary.wall_s = start.elapsed().as_secs_f64();
    if opts.profile {
        summary.profile = Some(shared.profile.table(
            start.elapsed(),
            summary.explained,
            &devices,
            gpu,
        ));
    }
    Ok(summary)
}

/// The reader: list inputs, keep this shard's and the ones not done before, number them.
fn read(sh: &Shared, mut inputs: Inputs, done: &DoneSet, tx: Sender<(u64, Input)>) {
    trace::name_thread("read");
    let mut seq = 0;
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        let t0 = Instant::now();
        let next = inputs.next();
        let Some(mut input) = next else {
            sh.profile.add(HostStage::Read, t0.elapsed());
            break;
        };
        if !sh.opts.shard.contains(&input.partition_key()) {
            sh.profile.add(HostStage::Read, t0.elapsed());
            continue;
        }
        if sh.opts.resume && input.problem.is_none() {
            if let Some(rel) = &input.rel {
                if done.contains(rel) {
                    sh.skipped.fetch_add(1, Ordering::Relaxed);
                    sh.profile.add(HostStage::Read, t0.elapsed());
                    continue;
                }
            }
        }
        if input.problem.is_none() {
            if let Some(t) = &input.targets {
                if let Err(msg) = t.check(sh.model.num_classes) {
                    input.problem = Some(Error::image(&input.path, msg));
                }
            }
        }
        sh.profile.add(HostStage::Read, t0.elapsed());
        sh.queued.fetch_add(1, Ordering::Relaxed);
        if tx.send((seq, input)).is_err() {
            return;
        }
        seq += 1;
    }
    sh.listed.store(true, Ordering::Relaxed);
}

/// A decode thread: read, decode and resize to the model's S×S.
fn decode(sh: &Shared, i: usize, rx: Receiver<(u64, Input)>, tx: Sender<Decoded>) {
    trace::name_thread(&format!("decode-{i}"));
    let (s, resize) = (sh.model.input_size, sh.opts.resize);
    for (seq, mut input) in rx {
        let rgb = match input.problem.take() {
            Some(e) => Err(e),
            None => sh.profile.time(HostStage::Decode, || {
                let _r = trace::range("decode");
                img::load_rgb(&input.path, s, resize)
            }),
        };
        if tx.send(Decoded { seq, input, rgb }).is_err() {
            return;
        }
    }
}

/// The grouper: decoded images back in input order, in groups of `--image-batch`; inputs that
/// failed so far go to the committer as error lines.
fn group(sh: &Shared, rx: Receiver<Decoded>, tx: Sender<Vec<Ready>>, commits: Sender<Commit>) {
    trace::name_thread("group");
    let batch = sh.opts.image_batch.max(1);
    let mut next = 0u64;
    let mut waiting: BTreeMap<u64, Decoded> = BTreeMap::new();
    let mut current: Vec<Ready> = Vec::with_capacity(batch);
    for d in rx {
        waiting.insert(d.seq, d);
        while let Some(d) = waiting.remove(&next) {
            next += 1;
            match d.rgb {
                Ok(rgb) => {
                    let targets = d
                        .input
                        .targets
                        .clone()
                        .unwrap_or_else(|| sh.opts.targets.clone());
                    current.push(Ready {
                        input: d.input,
                        rgb,
                        targets,
                    });
                    if current.len() == batch
                        && tx
                            .send(std::mem::replace(&mut current, Vec::with_capacity(batch)))
                            .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    if commits.send(sh.failed(&d.input, &e)).is_err() {
                        return;
                    }
                }
            }
        }
    }
    if !current.is_empty() {
        let _ = tx.send(current);
    }
}

/// A device worker: explain whole groups. A device error (as opposed to a bad image or memory
/// that runs out even at batch 1) retires the worker; when the last one retires the job stops.
fn work(
    sh: &Shared,
    mut worker: Box<dyn Worker>,
    rx: Receiver<Vec<Ready>>,
    tx: Sender<Explained>,
    commits: Sender<Commit>,
) {
    let device: Arc<str> = worker.name().into();
    trace::name_thread(&format!("explain-{device}"));
    let mut broken: Option<Error> = None;
    for items in rx {
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let (inputs, rest): (Vec<Input>, Vec<(Vec<u8>, Targets)>) = items
            .into_iter()
            .map(|r| (r.input, (r.rgb, r.targets)))
            .unzip();
        let (images, targets): (Vec<Vec<u8>>, Vec<Targets>) = rest.into_iter().unzip();
        let t0 = Instant::now();
        let result = {
            let _r = trace::range("explain");
            worker.explain(&images, &targets)
        };
        let elapsed = t0.elapsed();
        sh.profile.add(HostStage::Explain, elapsed);
        if sh.opts.profile {
            sh.profile.add_device(&worker.stage_times());
        }
        match result {
            Ok(explained) => {
                let ms = elapsed.as_secs_f64() * 1e3 / images.len().max(1) as f64;
                for ((input, rgb), ex) in inputs.into_iter().zip(images).zip(explained) {
                    let item = Explained {
                        input,
                        rgb,
                        ex,
                        ms,
                        device: device.clone(),
                    };
                    if tx.send(item).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                for input in &inputs {
                    if commits.send(sh.failed(input, &e)).is_err() {
                        return;
                    }
                }
                if matches!(e, Error::Cuda { .. } | Error::CudaUnavailable(_)) {
                    broken = Some(e);
                    break;
                }
            }
        }
    }
    let last = sh.workers_alive.fetch_sub(1, Ordering::SeqCst) == 1;
    if let Some(e) = broken {
        if !sh.opts.verbosity.eq(&Verbosity::Quiet) {
            eprintln!("error: device {device} stopped: {e}");
        }
        if last {
            let _ = commits.send(Commit::Fatal(Error::cuda(
                "every device",
                format!("the last device ({device}) failed: {e}"),
            )));
        }
    }
}

/// An image's files in memory: (path relative to the output directory, bytes).
type Files = Vec<(PathBuf, Vec<u8>)>;

/// The files of one explained image, and per map which files it has.
fn encode(sh: &Shared, item: &Explained) -> Result<(Files, Vec<MapFiles>)> {
    let _r = trace::range("encode");
    let s = sh.model.input_size;
    let rel =
        item.input.rel.as_deref().ok_or_else(|| {
            Error::Invalid("an explained input without a place in the tree".into())
        })?;
    let single = item.ex.maps.len() == 1;
    let mut files = Vec::new();
    let mut per_map = Vec::with_capacity(item.ex.maps.len());
    for m in &item.ex.maps {
        let name = if single {
            rel.to_path_buf()
        } else {
            with_suffix(rel, &format!(".class{}", m.class))
        };
        let mut mf = MapFiles::default();
        for &save in &sh.opts.saves {
            let path = with_suffix(&name, save.suffix());
            let shown = sh.tree.dir().join(&path);
            let side = s as u32;
            let bytes = match save {
                Save::Npy => img::encode_npy(&shown, &m.map, &[s as u64, s as u64])?,
                Save::Heatmap => img::encode_png(&shown, &img::colormap_jet(&m.map), side, side)?,
                Save::Overlay => {
                    img::encode_png(&shown, &img::overlay(&item.rgb, &m.map, 0.5), side, side)?
                }
            };
            mf.files.push((save, path.clone()));
            files.push((path, bytes));
        }
        per_map.push(mf);
    }
    Ok((files, per_map))
}

/// A write thread: encode, write the image's files as one transaction, hand its lines on.
fn write(sh: &Shared, i: usize, rx: Receiver<Explained>, tx: Sender<Commit>) {
    trace::name_thread(&format!("write-{i}"));
    for item in rx {
        let written = sh.profile.time(HostStage::Write, || {
            let (files, per_map) = encode(sh, &item)?;
            let placed = sh.tree.write_image(&files)?;
            Ok::<_, Error>((placed, per_map))
        });
        let msg = match written {
            Ok((files, per_map)) => {
                let rel = item.input.rel.as_deref().unwrap_or(&item.input.path);
                let lines = sh.ctx.success_lines(
                    &item.input.path,
                    rel,
                    &item.ex,
                    &per_map,
                    item.ms,
                    &item.device,
                );
                Commit::Done { lines, files }
            }
            Err(e @ Error::DiskFull { .. }) => Commit::Fatal(e),
            Err(e) => sh.failed(&item.input, &e),
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// The committer: make groups of finished images durable and append their lines; show progress.
fn commit(
    sh: &Shared,
    log: &mut ResultsLog,
    rx: Receiver<Commit>,
    progress: &mut Progress,
    counters: &[Arc<crate::cam::PassCounter>],
    summary: &mut Summary,
) {
    trace::name_thread("commit");
    let mut lines: Vec<String> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let (mut pending_ok, mut pending_failed) = (0u64, 0u64);
    let mut first_pending: Option<Instant> = None;
    let (mut seen_ok, mut seen_failed) = (0u64, 0u64);
    let mut fatal: Option<Error> = None;
    let mut open = true;
    while open {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Commit::Done { lines: l, files: f }) => {
                lines.extend(l);
                files.extend(f);
                pending_ok += 1;
                seen_ok += 1;
                first_pending.get_or_insert_with(Instant::now);
            }
            Ok(Commit::Failed { line, msg }) => {
                progress.message(&msg);
                lines.push(line);
                pending_failed += 1;
                seen_failed += 1;
                first_pending.get_or_insert_with(Instant::now);
            }
            Ok(Commit::Fatal(e)) => {
                fatal = Some(e);
                open = false;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        let due = first_pending.is_some_and(|t| t.elapsed() >= COMMIT_EVERY)
            || (pending_ok + pending_failed) as usize >= COMMIT_IMAGES;
        if (due || !open) && !lines.is_empty() {
            let committed = sh.profile.time(HostStage::Commit, || {
                sh.tree.sync(&files)?;
                log.append(&lines)
            });
            match committed {
                Ok(repaired) => {
                    if repaired {
                        progress.message(&format!(
                            "notice: {} ended in a partial line (an interrupted run); it was cut off",
                            log.path().display()
                        ));
                    }
                    summary.explained += pending_ok;
                    summary.failed += pending_failed;
                }
                Err(e) => {
                    // The lines are not in the file: their images count as not done.
                    fatal.get_or_insert(e);
                    open = false;
                }
            }
            lines.clear();
            files.clear();
            pending_ok = 0;
            pending_failed = 0;
            first_pending = None;
        }
        let (done, planned) = counters.iter().fold((0, 0), |(d, p), c| {
            (
                d + c.done.load(Ordering::Relaxed),
                p + c.planned.load(Ordering::Relaxed),
            )
        });
        progress.update(&Snapshot {
            explained: seen_ok,
            failed: seen_failed,
            skipped: sh.skipped.load(Ordering::Relaxed),
            total: sh
                .listed
                .load(Ordering::Relaxed)
                .then(|| sh.queued.load(Ordering::Relaxed)),
            passes_done: done,
            passes_planned: planned,
        });
    }
    if let Some(e) = fatal {
        sh.stop.store(true, Ordering::Relaxed);
        summary.stopped = Some(crate::error::one_line(&e.to_string()));
    }
    // Dropping `rx` here refuses every further send: the other threads wind down.
}
