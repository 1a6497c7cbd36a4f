//! Splitting one job over several processes: shard `I/N` explains the inputs whose relative path
//! hashes to `I` modulo `N` (xxHash64, seed 0, over the path's bytes). The partition depends on
//! nothing but the path, so every shard agrees on it whatever order or machine it runs in: the
//! shards' union is every input and none is explained twice.
//!
//! The shard comes from `--shard I/N`, else from a Slurm job array (`SLURM_ARRAY_TASK_ID` minus
//! `SLURM_ARRAY_TASK_MIN`, over `SLURM_ARRAY_TASK_STEP`, of `SLURM_ARRAY_TASK_COUNT` tasks), else
//! from a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, with the count from `--shard-count`).

use std::fmt;

use twox_hash::XxHash64;

use crate::error::{Error, Result};

/// This process's share of the inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Everything: no sharding.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    fn new(index: u64, count: u64, what: &str) -> Result<Shard> {
        if count == 0 || index >= count {
            return Err(Error::Usage(format!(
                "{what}: shard {index} of {count} does not exist (need 0 <= I < N)"
            )));
        }
        Ok(Shard { index, count })
    }

    /// Parse `I/N`.
    pub fn parse(s: &str) -> Result<Shard> {
        let what = format!("--shard {s}");
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| Error::Usage(format!("{what}: expected I/N, e.g. 0/4")))?;
        let num = |x: &str| {
            x.trim()
                .parse::<u64>()
                .map_err(|_| Error::Usage(format!("{what}: `{x}` is not a number")))
        };
        Shard::new(num(i)?, num(n)?, &what)
    }

    /// Is the input with this partition key in this shard?
    pub fn contains(&self, key: &[u8]) -> bool {
        self.count == 1 || XxHash64::oneshot(0, key) % self.count == self.index
    }

    pub fn is_all(&self) -> bool {
        self.count == 1
    }
}

/// The shard and where it came from (for the start-up notice), from the flags and the
/// environment (`env` looks a variable up; the process environment in the binary).
pub fn resolve(
    flag: Option<&str>,
    shard_count: Option<u64>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Shard, Option<String>)> {
    if let Some(s) = flag {
        if shard_count.is_some() {
            return Err(Error::Usage(
                "--shard-count goes with JOB_COMPLETION_INDEX or a Slurm array, not with --shard"
                    .into(),
            ));
        }
        return Ok((Shard::parse(s)?, None));
    }
    let var = |name: &str| -> Result<Option<u64>> {
        match env(name).filter(|v| !v.trim().is_empty()) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| Error::Usage(format!("{name}={v}: not a non-negative integer"))),
        }
    };
    if let Some(id) = var("SLURM_ARRAY_TASK_ID")? {
        let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = var("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let count = match (shard_count, var("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(n), _) | (None, Some(n)) => n,
            // Slurm before 22.05 has no TASK_COUNT: derive it from the range.
            (None, None) => match var("SLURM_ARRAY_TASK_MAX")? {
                Some(max) if max >= min => (max - min) / step + 1,
                _ => {
                    return Err(Error::Usage(
                        "SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor \
                         SLURM_ARRAY_TASK_MAX: pass --shard I/N"
                            .into(),
                    ))
                }
            },
        };
        let offset = id.checked_sub(min).filter(|o| o % step == 0);
        let what = format!(
            "Slurm array task {id} (min {min}, step {step}, {count} tasks): the array's ids \
             must be a range like --array=0-{}; otherwise pass --shard I/N",
            count.saturating_sub(1)
        );
        let index = offset
            .map(|o| o / step)
            .ok_or_else(|| Error::Usage(what.clone()))?;
        let shard = Shard::new(index, count, &what)?;
        return Ok((shard, Some(format!("Slurm array task {id}"))));
    }
    if let Some(index) = var("JOB_COMPLETION_INDEX")? {
        let count = shard_count.ok_or_else(|| {
            Error::Usage(
                "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): pass --shard-count N \
                 with the Job's completions, or --shard I/N"
                    .into(),
            )
        })?;
        let shard = Shard::new(index, count, "JOB_COMPLETION_INDEX")?;
        return Ok((shard, Some(format!("JOB_COMPLETION_INDEX={index}"))));
    }
    if shard_count.is_some() {
        return Err(Error::Usage(
            "--shard-count needs JOB_COMPLETION_INDEX or a Slurm array task in the environment"
                .into(),
        ));
    }
    Ok((Shard::ALL, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn parses_flag() {
        assert_eq!(Shard::parse("2/5").unwrap(), Shard { index: 2, count: 5 });
        for bad in ["5/5", "1/0", "x/2", "3", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn partition_is_exact() {
        let keys: Vec<String> = (0..2000)
            .map(|i| format!("dir{}/img{i}.jpg", i % 7))
            .collect();
        for n in [1u64, 2, 3, 8] {
            let mut seen = vec![0; keys.len()];
            for i in 0..n {
                let s = Shard { index: i, count: n };
                for (k, key) in keys.iter().enumerate() {
                    if s.contains(key.as_bytes()) {
                        seen[k] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n = {n}");
        }
        // Stable across versions and machines: a fixed value of the spec'd hash.
        assert_eq!(XxHash64::oneshot(0, b""), 0xEF46DB3751D8E999);
    }

    #[test]
    fn slurm_and_kubernetes_variables() {
        let none = env(&[]);
        assert_eq!(resolve(None, None, &none).unwrap().0, Shard::ALL);
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_MAX", "9"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(
            resolve(None, None, &slurm).unwrap().0,
            Shard { index: 1, count: 3 }
        );
        // Old Slurm: count from MIN/MAX/STEP.
        let old = env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_MAX", "9"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert_eq!(
            resolve(None, None, &old).unwrap().0,
            Shard { index: 2, count: 3 }
        );
        // An id off the step grid, or past the count, is refused.
        let gap = env(&[
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert!(resolve(None, None, &gap).is_err());
        let list = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert!(resolve(None, None, &list).is_err());
        // The flag wins over the environment.
        assert_eq!(resolve(Some("0/1"), None, &slurm).unwrap().0, Shard::ALL);
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert!(resolve(None, None, &k8s).is_err());
        assert_eq!(
            resolve(None, Some(4), &k8s).unwrap().0,
            Shard { index: 2, count: 4 }
        );
        assert!(resolve(None, Some(2), &k8s).is_err());
        assert!(resolve(None, Some(2), &none).is_err());
    }
}
