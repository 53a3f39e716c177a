//! Data-parallel training across processes (docs/distributed.md): where a process stands in its
//! job (torchrun's or SLURM's environment), the c10d process group (`group`), and what the
//! trainer does through it: gradients averaged in flat buckets, the initial student broadcast,
//! a weight checksum compared across ranks, scalars averaged, a stop step agreed.
pub mod group;

pub use group::{Backend, ProcessGroup};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// Where this process stands in a multi-process job, from its launcher's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among this node's processes: picks the GPU (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The TCPStore is hosted by the launcher (torchrun's agent), not by rank 0.
    pub store_is_external: bool,
    /// Keys of this run in the store, apart from the agent's own and from earlier attempts.
    pub store_prefix: String,
    /// `torchrun`, `RANK/WORLD_SIZE` (set by another launcher or by hand) or `SLURM`, for messages.
    pub launcher: &'static str,
}

/// The TCPStore port when SLURM's environment names none: one per job, so two jobs sharing a
/// node do not meet (what PyTorch Lightning does too).
fn slurm_port(job_id: &str) -> u16 {
    let id: u64 = job_id.parse().unwrap_or(0);
    (15000 + id % 20000) as u16
}

/// The first host of a SLURM node list: `node[03-05,9],gpu1` → `node03`.
pub fn first_slurm_host(nodelist: &str) -> String {
    let head = match nodelist.find([',', '[']) {
        Some(i) if nodelist.as_bytes()[i] == b'[' => {
            let rest = &nodelist[i + 1..];
            let first = rest.split([',', '-', ']']).next().unwrap_or("");
            return format!("{}{first}", &nodelist[..i]);
        }
        Some(i) => &nodelist[..i],
        None => nodelist,
    };
    head.to_string()
}

impl Launch {
    /// The launch of this process, from `env` (the process environment in `sdkd train`):
    /// torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`LOCAL_WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`
    /// (also set by hand, or by any launcher that speaks them), else SLURM's
    /// `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID` with `MASTER_ADDR`/`MASTER_PORT` or the job's
    /// first host. None when neither is set (or SLURM runs one task): one process, as ever.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let num = |k: &str, v: String| -> Result<usize> {
            v.trim().parse::<usize>().with_context(|| format!("launch environment: {k}={v:?} is not a non-negative integer"))
        };
        let port_number = |p: &str| -> Result<u16> {
            p.trim().parse::<u16>().ok().filter(|p| *p > 0).with_context(|| format!("launch environment: MASTER_PORT={p:?} is not a port (1-65535)"))
        };
        let torchrun = ["RANK", "WORLD_SIZE", "LOCAL_RANK"].iter().any(|k| get(k).is_some());
        let launch = if torchrun {
            let rank = num("RANK", get("RANK").context("launch environment: WORLD_SIZE or LOCAL_RANK is set but RANK is not")?)?;
            let world_size = num("WORLD_SIZE", get("WORLD_SIZE").context("launch environment: RANK is set but WORLD_SIZE is not")?)?;
            let local_rank = get("LOCAL_RANK").map(|v| num("LOCAL_RANK", v)).transpose()?.unwrap_or(rank);
            let local_world_size = get("LOCAL_WORLD_SIZE").map(|v| num("LOCAL_WORLD_SIZE", v)).transpose()?.unwrap_or(world_size);
            let master_addr = get("MASTER_ADDR").context(
                "launch environment: RANK and WORLD_SIZE are set but MASTER_ADDR is not (the host of rank 0's rendezvous store; torchrun sets it)",
            )?;
            let port = get("MASTER_PORT").context("launch environment: RANK and WORLD_SIZE are set but MASTER_PORT is not (torchrun sets it)")?;
            let master_port = port_number(&port)?;
            let agent = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let run = get("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".into());
            let attempt = get("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
            Launch {
                rank,
                world_size,
                local_rank,
                local_world_size,
                master_addr,
                master_port,
                store_is_external: agent,
                store_prefix: format!("sdkd/{run}/{attempt}/"),
                launcher: if agent { "torchrun" } else { "RANK/WORLD_SIZE" },
            }
        } else if let Some(procid) = get("SLURM_PROCID") {
            let rank = num("SLURM_PROCID", procid)?;
            let world_size = num("SLURM_NTASKS", get("SLURM_NTASKS").context("launch environment: SLURM_PROCID is set but SLURM_NTASKS is not")?)?;
            if world_size == 1 && rank == 0 {
                return Ok(None);
            }
            let local_rank = get("SLURM_LOCALID").map(|v| num("SLURM_LOCALID", v)).transpose()?.unwrap_or(0);
            let local_world_size = get("SLURM_NTASKS_PER_NODE")
                .and_then(|v| v.split(['(', ',']).next().and_then(|n| n.trim().parse().ok()))
                .unwrap_or(world_size);
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => first_slurm_host(&get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")).context(
                    "launch environment: SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is",
                )?),
            };
            let job = get("SLURM_JOB_ID").unwrap_or_else(|| "0".into());
            let master_port = match get("MASTER_PORT") {
                Some(p) => port_number(&p)?,
                None => slurm_port(&job),
            };
            let attempt = get("SLURM_RESTART_COUNT").unwrap_or_else(|| "0".into());
            Launch {
                rank,
                world_size,
                local_rank,
                local_world_size,
                master_addr,
                master_port,
                store_is_external: false,
                store_prefix: format!("sdkd/{job}/{attempt}/"),
                launcher: "SLURM",
            }
        } else {
            return Ok(None);
        };
        let (r, w, lr, lw) = (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size);
        let (rank_var, world_var) = if launch.launcher == "SLURM" { ("SLURM_PROCID", "SLURM_NTASKS") } else { ("RANK", "WORLD_SIZE") };
        if w == 0 {
            bail!("launch environment: {world_var}=0: a job has at least one process");
        }
        if r >= w {
            bail!("launch environment: {rank_var}={r} is not below {world_var}={w} (ranks are 0..{w})");
        }
        if lw == 0 || lr >= lw || lw > w {
            bail!("launch environment: local rank {lr} of {lw} processes on this node does not fit a job of {w}");
        }
        Ok(Some(launch))
    }

    /// The device of this rank: the CPU when `device` is, else `cuda:LOCAL_RANK`.
    pub fn device(&self, device: Device) -> Result<Device> {
        if device == Device::Cpu {
            return Ok(Device::Cpu);
        }
        let n = tch::Cuda::device_count() as usize;
        if self.local_rank >= n {
            bail!("local rank {} needs cuda:{}, but this node has {n} CUDA device(s)", self.local_rank, self.local_rank);
        }
        Ok(Device::Cuda(self.local_rank))
    }
}

/// A process group and what data-parallel training does with it.
pub struct Ranks {
    pub group: ProcessGroup,
}

/// Gradients are summed in flat buffers of about this size (DDP's default bucket, 25 MiB):
/// few enough collectives that their latency does not add up, small enough to pack quickly.
pub const BUCKET_BYTES: usize = 25 << 20;

impl Ranks {
    /// Joins the process group of `launch` for work on `device` (as a config resolves it): Gloo
    /// on the CPU, NCCL on `cuda:LOCAL_RANK`. Returns the group and this rank's device.
    pub fn join(launch: &Launch, device: Device, timeout: std::time::Duration) -> Result<(Ranks, Device)> {
        let device = launch.device(device)?;
        let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
        if !backend.available() {
            bail!("{device:?}: a data-parallel CUDA run needs NCCL, which this sdkd was built without (no CUDA and NCCL headers at build time)");
        }
        let group = ProcessGroup::join(launch, backend, timeout)?;
        Ok((Ranks { group }, device))
    }

    pub fn rank(&self) -> usize {
        self.group.rank
    }

    pub fn size(&self) -> usize {
        self.group.size
    }

    pub fn is_leader(&self) -> bool {
        self.group.rank == 0
    }

    /// Replaces every tensor by rank 0's (the initial student: every rank starts from its
    /// weights whatever its own initialisation drew).
    pub fn broadcast_from_leader(&self, ts: &[Tensor]) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for chunk in buckets(ts, BUCKET_BYTES) {
                let flat = flatten(&chunk);
                self.group.broadcast(&[&flat], 0)?;
                unflatten_into(&flat, &chunk);
            }
            Ok(())
        })
    }

    /// Averages the gradients of `params` over the ranks: packed into flat ~25 MiB buckets,
    /// one all-reduce each (all issued before any is waited for), divided by the world size and
    /// copied back. A parameter without a gradient counts as zeros; it stays without one when
    /// no rank has one (the same on every rank, which run the same graph).
    pub fn average_gradients(&self, params: &[Tensor]) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let grads: Vec<Tensor> = params.iter().map(|p| {
                let g = p.grad();
                if g.defined() { g } else { Tensor::zeros_like(p) }
            }).collect();
            let defined: Vec<bool> = params.iter().map(|p| p.grad().defined()).collect();
            let chunks: Vec<Vec<(usize, Tensor)>> = bucket_indices(&grads, BUCKET_BYTES)
                .into_iter()
                .map(|idx| idx.into_iter().map(|i| (i, grads[i].shallow_clone())).collect())
                .collect();
            let mut flats: Vec<Tensor> = chunks.iter().map(|c| flatten(&c.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>())).collect();
            self.group.all_reduce_sum(&flats.iter().collect::<Vec<_>>())?;
            let inv = 1.0 / self.size() as f64;
            for (flat, chunk) in flats.iter_mut().zip(&chunks) {
                let _ = flat.f_mul_scalar_(inv)?;
                let mut offset = 0i64;
                for (i, g) in chunk {
                    let n = g.numel() as i64;
                    if defined[*i] {
                        let mut g = g.shallow_clone();
                        g.copy_(&flat.narrow(0, offset, n).view_as(&g));
                    }
                    offset += n;
                }
            }
            Ok(())
        })
    }

    /// `values` averaged over the ranks (f64, so the order of additions is all that differs
    /// from a one-process run).
    pub fn mean(&self, values: &[f64]) -> Result<Vec<f64>> {
        if values.is_empty() {
            return Ok(vec![]);
        }
        let t = Tensor::from_slice(values).to_device(self.group.device);
        self.group.all_reduce_sum(&[&t])?;
        let sum: Vec<f64> = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
        Ok(sum.into_iter().map(|v| v / self.size() as f64).collect())
    }

    /// `values` summed over the ranks.
    pub fn sum_counts(&self, values: &[i64]) -> Result<Vec<i64>> {
        self.reduce_counts(values, false)
    }

    /// `values`' maxima over the ranks.
    pub fn max_counts(&self, values: &[i64]) -> Result<Vec<i64>> {
        self.reduce_counts(values, true)
    }

    fn reduce_counts(&self, values: &[i64], max: bool) -> Result<Vec<i64>> {
        let t = Tensor::from_slice(values).to_device(self.group.device);
        match max {
            true => self.group.all_reduce_max(&[&t])?,
            false => self.group.all_reduce_sum(&[&t])?,
        }
        Ok(Vec::<i64>::try_from(&t.to_device(Device::Cpu))?)
    }

    /// Whether any rank raised its flag: every rank gets the same answer, so all stop at the
    /// same step.
    pub fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.max_counts(&[flag as i64])?[0] != 0)
    }

    /// Fails unless every rank holds `checksum`, naming the ranks that differ.
    pub fn check_same(&self, checksum: i64, what: &str) -> Result<()> {
        let all = Tensor::zeros([self.size() as i64], (Kind::Int64, self.group.device));
        let _ = all.narrow(0, self.rank() as i64, 1).fill_(checksum);
        self.group.all_reduce_sum(&[&all])?;
        let all = Vec::<i64>::try_from(&all.to_device(Device::Cpu))?;
        let differing: Vec<String> = all.iter().enumerate().filter(|(_, c)| **c != all[0]).map(|(r, _)| r.to_string()).collect();
        if !differing.is_empty() {
            bail!("{what} of rank(s) {} differ from rank 0's (checksums {all:?}): the ranks no longer train the same model", differing.join(", "));
        }
        Ok(())
    }
}

/// Groups consecutive tensors into lists of at most `bytes` (a larger tensor is a list alone).
pub(crate) fn bucket_indices(ts: &[Tensor], bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut size = 0usize;
    for (i, t) in ts.iter().enumerate() {
        let b = t.numel() * t.kind().elt_size_in_bytes();
        if out.is_empty() || size + b > bytes {
            out.push(vec![]);
            size = 0;
        }
        out.last_mut().expect("pushed above").push(i);
        size += b;
    }
    out
}

fn buckets(ts: &[Tensor], bytes: usize) -> Vec<Vec<Tensor>> {
    bucket_indices(ts, bytes).into_iter().map(|idx| idx.into_iter().map(|i| ts[i].shallow_clone()).collect()).collect()
}

fn flatten(ts: &[Tensor]) -> Tensor {
    Tensor::cat(&ts.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0)
}

fn unflatten_into(flat: &Tensor, ts: &[Tensor]) {
    let mut offset = 0i64;
    for t in ts {
        let n = t.numel() as i64;
        let mut t = t.shallow_clone();
        t.copy_(&flat.narrow(0, offset, n).view_as(&t));
        offset += n;
    }
}

/// A 64-bit checksum of tensors' exact bits (their order included): equal on two ranks exactly
/// when, but for a vanishing chance, they hold bit-identical tensors.
pub fn checksum(ts: &[Tensor]) -> i64 {
    tch::no_grad(|| {
        let mut acc: u64 = 0;
        for (i, t) in ts.iter().enumerate() {
            let t = t.detach().to_device(Device::Cpu).contiguous();
            let bytes = t.numel() * t.kind().elt_size_in_bytes();
            let mut buf = vec![0u8; bytes];
            t.copy_data_u8(&mut buf, t.numel());
            let mut h = crate::data::order::splitmix64(i as u64 ^ 0x5d_4b_2c_1a);
            for chunk in buf.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                h = crate::data::order::splitmix64(h ^ u64::from_le_bytes(word));
            }
            acc = acc.wrapping_add(h);
        }
        acc as i64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_slurm_and_none() {
        assert_eq!(Launch::from_env(env(&[])).unwrap(), None);
        let t = Launch::from_env(env(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "29500"), ("TORCHELASTIC_USE_AGENT_STORE", "True")]))
            .unwrap()
            .unwrap();
        assert_eq!((t.rank, t.world_size, t.local_rank, t.local_world_size, t.store_is_external), (1, 4, 1, 2, true));
        let s = Launch::from_env(env(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_NODELIST", "gpu[07-08]"), ("SLURM_JOB_ID", "12345"), ("SLURM_NTASKS_PER_NODE", "4(x2)")]))
            .unwrap()
            .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank, s.local_world_size, s.master_addr.as_str()), (3, 8, 1, 4, "gpu07"));
        assert!(!s.store_is_external);
        assert_eq!(Launch::from_env(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap(), None);
    }

    #[test]
    fn bad_launch_environments_are_named() {
        let e = Launch::from_env(env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")])).unwrap_err().to_string();
        assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = Launch::from_env(env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR is not"), "{e}");
        let e = Launch::from_env(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err().to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = Launch::from_env(env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")])).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT=\"70000\""), "{e}");
    }

    #[test]
    fn slurm_first_host() {
        assert_eq!(first_slurm_host("node[03-05,9],gpu1"), "node03");
        assert_eq!(first_slurm_host("a1,b2"), "a1");
        assert_eq!(first_slurm_host("single"), "single");
    }

    #[test]
    fn buckets_hold_at_most_their_size() {
        let ts: Vec<Tensor> = [10, 10, 30, 5].iter().map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu))).collect();
        assert_eq!(bucket_indices(&ts, 80), vec![vec![0, 1], vec![2], vec![3]]);
        let a = vec![Tensor::from_slice(&[1.0f32, 2.0])];
        let b = vec![Tensor::from_slice(&[1.0f32, 2.0000002])];
        assert_eq!(checksum(&a), checksum(&[a[0].copy()]));
        assert_ne!(checksum(&a), checksum(&b));
    }
}
