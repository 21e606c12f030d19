//! One worker per core over a list of independent jobs (photos to preprocess), with a
//! progress bar; results come back in list order, so a run is byte-identical to a serial
//! one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

/// `f(index, item)` for every item, on all cores, in item order. The first job that fails
/// (in item order) stops the run: no new job starts and its error is returned.
pub fn map_in_order<T: Sync, R: Send>(
    items: &[T],
    label: &str,
    f: impl Fn(usize, &T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let bar = ProgressBar::new(items.len() as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}<{{eta}}]"
        ))
        .expect("valid template"),
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicUsize::new(0);
    // Each result lands in its own slot, so the order does not depend on the workers.
    let slots: Vec<Mutex<Option<Result<R>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(k) else { break };
                    let r = f(k, item);
                    let failed = r.is_err();
                    *slots[k].lock().expect("no panics while held") = Some(r);
                    bar.inc(1);
                    if failed {
                        // Every job before this one has started and will finish, so the
                        // first error in item order is among the filled slots.
                        next.store(items.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut out = Vec::with_capacity(items.len());
    for slot in slots {
        match slot.into_inner().expect("no panics while held") {
            Some(r) => out.push(r?),
            None => bail!("{label}: stopped early without an error (a bug)"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_order_and_the_first_error_wins() {
        let items: Vec<u64> = (0..200).collect();
        let squares = map_in_order(&items, "test", |i, &x| {
            assert_eq!(i as u64, x);
            Ok(x * x)
        })
        .unwrap();
        assert_eq!(squares, items.iter().map(|x| x * x).collect::<Vec<_>>());
        let err = map_in_order(&items, "test", |_, &x| {
            if x == 17 || x == 150 {
                bail!("item {x} failed")
            }
            Ok(x)
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "item 17 failed");
        assert!(
            map_in_order(&[] as &[u8], "test", |_, _| Ok(()))
                .unwrap()
                .is_empty()
        );
    }
}
