//! Metrics: `proxy_define_metric`, `proxy_increment_metric`,
//! `proxy_record_metric`, `proxy_get_metric`. A metric's id is its index in
//! [`crate::HostState::metrics`]; metrics are per VM.

use super::memory::{read_str, write_u32, write_u64};
use super::{answer, Caller, HostResult, Status, ENV};
use crate::{HostState, Metric};
use wasmtime::Linker;

/// proxy-wasm's metric types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

impl MetricKind {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return None,
        })
    }
}

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_define_metric",
        |mut c: Caller<'_>, kind: i32, np: i32, nl: i32, ret: i32| {
            c.data_mut().note_host_call("proxy_define_metric");
            answer(define_metric(&mut c, kind, np, nl, ret))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_increment_metric",
        |mut c: Caller<'_>, id: i32, offset: i64| {
            c.data_mut().note_host_call("proxy_increment_metric");
            answer(increment_metric(&mut c, id, offset))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_record_metric",
        |mut c: Caller<'_>, id: i32, value: i64| {
            c.data_mut().note_host_call("proxy_record_metric");
            answer(record_metric(&mut c, id, value))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_metric",
        |mut c: Caller<'_>, id: i32, ret: i32| {
            c.data_mut().note_host_call("proxy_get_metric");
            answer(get_metric(&mut c, id, ret))
        },
    )?;
    Ok(())
}

fn metric_mut(state: &mut HostState, id: i32) -> HostResult<&mut Metric> {
    state
        .metrics
        .get_mut(id as u32 as usize)
        .ok_or(Status::NotFound)
}

/// Defines a metric, or finds the one already defined with that name.
fn define_metric(c: &mut Caller<'_>, kind: i32, np: i32, nl: i32, ret: i32) -> HostResult {
    let kind = MetricKind::from_raw(kind).ok_or(Status::BadArgument)?;
    let name = read_str(c, np, nl)?;
    let metrics = &mut c.data_mut().metrics;
    let id = match metrics.iter().position(|m| m.name == name) {
        Some(i) => i,
        None => {
            metrics.push(Metric {
                kind,
                name,
                value: 0,
            });
            metrics.len() - 1
        }
    };
    write_u32(c, ret, id as u32)
}

/// Adds to a counter or gauge; a histogram is only recorded.
fn increment_metric(c: &mut Caller<'_>, id: i32, offset: i64) -> HostResult {
    let metric = metric_mut(c.data_mut(), id)?;
    if metric.kind == MetricKind::Histogram {
        return Err(Status::BadArgument);
    }
    metric.value = metric.value.saturating_add_signed(offset);
    Ok(())
}

fn record_metric(c: &mut Caller<'_>, id: i32, value: i64) -> HostResult {
    metric_mut(c.data_mut(), id)?.value = value as u64;
    Ok(())
}

fn get_metric(c: &mut Caller<'_>, id: i32, ret: i32) -> HostResult {
    let value = metric_mut(c.data_mut(), id)?.value;
    write_u64(c, ret, value)
}
