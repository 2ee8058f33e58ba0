//! Policy calls that wait for the fleet's store without blocking their worker.
//!
//! With `[shared] backend = "redis"`, `on_upgrade` and `on_close` run in a Lua coroutine.
//! When the script calls `gw.shared`, the Rust function parks the store's future here and
//! returns a sentinel; a Lua wrapper (see `gw::waiting`) yields it. [`segment`] sees the
//! yield, and [`drive`] awaits the future (bounded by `shared.timeout`) while the worker
//! serves its other connections, then resumes the coroutine with the answer. The call's CPU
//! limit counts the time spent running Lua in all its segments, not the time spent waiting.
//!
//! Only the coroutine of the call being driven may wait: a frame policy, or a coroutine a
//! policy made itself, gets the non-waiting behaviour (cached reads, writes sent behind).

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use mlua::{IntoLuaMulti, LightUserData, Lua, MultiValue, Thread, Value};

use mlua::thread::ThreadStatus;

use super::{Limits, Vm};
use crate::policy::shared::{FleetError, SharedValue};

/// Most waits one policy call may make: each is a round trip to the store.
pub(crate) const MAX_WAITS: usize = 16;

/// What a parked operation answers the script.
pub(crate) enum Answer {
    /// A value (`get`, `incr`), or nil.
    Value(Option<SharedValue>),
    /// `set`, `delete`: true.
    Done,
}

/// A parked operation.
pub(crate) type Parked = Pin<Box<dyn Future<Output = Result<Answer, FleetError>> + Send>>;

/// The VM's slot for the operation the running call waits for.
pub(crate) struct Waits {
    /// The coroutine that may wait now (the one [`segment`] is resuming); null: none.
    driver: Cell<*const c_void>,
    parked: RefCell<Option<Parked>>,
}

/// The value the wrapper yields: its address is unique to this module.
static SENTINEL: u8 = 0;

/// The sentinel as a Lua value.
pub(crate) fn sentinel() -> Value {
    Value::LightUserData(LightUserData(std::ptr::addr_of!(SENTINEL) as *mut c_void))
}

impl Waits {
    pub(crate) fn new() -> Waits {
        Waits {
            driver: Cell::new(std::ptr::null()),
            parked: RefCell::new(None),
        }
    }

    /// Whether the running Lua code is the driven coroutine, which may wait.
    pub(crate) fn can_wait(&self, lua: &Lua) -> bool {
        let driver = self.driver.get();
        !driver.is_null() && lua.current_thread().to_pointer() == driver
    }

    /// Parks `op` for the driver and returns the sentinel for the wrapper to yield.
    pub(crate) fn park(&self, op: Parked) -> Value {
        *self.parked.borrow_mut() = Some(op);
        sentinel()
    }
}

/// Where a call stands after a segment.
pub(crate) enum Step {
    /// It returned these values.
    Done(MultiValue),
    /// It waits for this operation.
    Wait(Parked),
}

/// Runs `thread` until it returns or waits, under what is left of `limits` after `spent`.
pub(crate) fn segment(
    vm: &Vm,
    thread: &Thread,
    args: impl IntoLuaMulti,
    limits: Limits,
    spent: &mut Duration,
) -> mlua::Result<Step> {
    let started = Instant::now();
    let remaining = Limits {
        cpu: limits
            .cpu
            .saturating_sub(*spent)
            .max(Duration::from_micros(1)),
        ..limits
    };
    // An operation parked by a call that could not yield (inside a metamethod, which Lua
    // refuses to yield across) is stale: never the answer to this segment's yield.
    vm.waits.parked.borrow_mut().take();
    vm.waits.driver.set(thread.to_pointer());
    let result = vm.guarded(remaining, || thread.resume::<MultiValue>(args));
    vm.waits.driver.set(std::ptr::null());
    *spent += started.elapsed();
    let values = result?;
    if thread.status() != ThreadStatus::Resumable {
        return Ok(Step::Done(values));
    }
    match vm.waits.parked.borrow_mut().take() {
        Some(op) => Ok(Step::Wait(op)),
        None => Err(mlua::Error::runtime(
            "coroutine.yield outside a coroutine the policy made",
        )),
    }
}

/// When [`drive`] calls its `around` function.
pub(crate) enum Around {
    /// Before a segment.
    Before,
    /// After a segment that waits again.
    Waiting,
}

/// Awaits `op`, resumes `thread` with its answer, and so on until the call returns; at most
/// [`MAX_WAITS`] waits in all. `around` runs before each segment and after each segment that
/// waits again (`on_upgrade` puts its `req` state back, and aside).
pub(crate) async fn drive(
    vm: &Vm,
    thread: &Thread,
    mut op: Parked,
    limits: Limits,
    spent: &mut Duration,
    around: &mut dyn FnMut(Around) -> mlua::Result<()>,
) -> mlua::Result<MultiValue> {
    let mut waits = 1;
    loop {
        let answer = op.await;
        let lua = &vm.lua;
        let args = match answer {
            Ok(Answer::Value(Some(v))) => super::gw::from_shared(lua, v)?.into_lua_multi(lua)?,
            Ok(Answer::Value(None)) => Value::Nil.into_lua_multi(lua)?,
            Ok(Answer::Done) => true.into_lua_multi(lua)?,
            Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua)?,
        };
        around(Around::Before)?;
        match segment(vm, thread, args, limits, spent)? {
            Step::Done(values) => return Ok(values),
            Step::Wait(next) => {
                around(Around::Waiting)?;
                waits += 1;
                if waits > MAX_WAITS {
                    return Err(mlua::Error::runtime(format!(
                        "more than {MAX_WAITS} waits for gw.shared in one call"
                    )));
                }
                op = next;
            }
        }
    }
}
