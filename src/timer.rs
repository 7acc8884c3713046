//! A hierarchical hashed timer wheel: the protocol's pending acks and retries.
//!
//! # Structure
//!
//! Time is counted in whole ticks since a start instant. The wheel has six
//! levels of 64 slots. A slot of level `n` spans `64^n` ticks, so level 0
//! resolves single ticks and one turn of the top level covers `64^6 = 2^36`
//! ticks (about 10.9 years of 5 ms ticks). A timer is filed in the level
//! where its deadline's tick count first differs from the current tick, read
//! six bits at a time: a deadline 3 ticks away sits in level 0, one 100 ticks
//! away in level 1. When the wheel reaches a slot of a higher level, it
//! *cascades* the slot: each of its timers moves down to the finer level
//! where it now belongs, so a timer is moved at most once per level before
//! it fires from level 0.
//!
//! Each level keeps a `u64` bitmap of its occupied slots, so the next slot to
//! process is found with a rotate and a count of trailing zeros instead of by
//! stepping tick by tick. A jump of ten million ticks — a simulator moving
//! virtual time to the next deadline — costs one step per occupied slot on
//! the way, not one per tick. A jump past a full turn of the top level
//! re-files every timer at once.
//!
//! A deadline beyond the top level's reach is parked at the farthest slot
//! the top level can address and cascades again from there, as many times as
//! it takes.
//!
//! # Rounding up
//!
//! A deadline is rounded *up* to the next tick boundary, so a timer never
//! fires early: an ack timeout that fired 3 ms short of its 500 ms would give
//! up on a peer whose ack may still be on its way, while firing up to one
//! tick late costs nothing. [`TimerWheel::poll_timeout`] reports tick
//! boundaries, so the driver wakes when something is actually due.
//!
//! # Cancellation
//!
//! Values live in a [`Slab`]; the slots hold only `(index, generation)`
//! records. Cancelling removes the value from the slab in O(1) and leaves the
//! record behind: when its slot is processed the generation no longer
//! matches (the slab index may even hold a newer timer by then) and the
//! record is dropped. A cancelled timer's record therefore lives at most
//! until the wheel passes its slot.
//!
//! # Bounds
//!
//! The wheel holds what its owner inserts; the owner bounds how many timers
//! it keeps pending. Slots, the slab and the due queue keep their storage and
//! reuse it.

use core::cmp::Reverse;
use core::fmt;
use core::iter;
use core::mem;
use core::time::Duration;
use std::collections::BinaryHeap;
use std::collections::binary_heap::PeekMut;
use std::time::Instant;

use slab::Slab;

/// Slots per level: one `u64` bitmap covers a level.
const SLOTS: usize = 64;
/// Each level reads the next six bits of a tick count as its slot index.
const SLOT_BITS: u32 = 6;
/// Six levels address `2^36` ticks ahead before deadlines are parked.
const LEVELS: usize = 6;
const TOP: usize = LEVELS - 1;
/// The tick of a deadline too far away to count in `u64` ticks. Such a timer
/// is kept (and can be cancelled) but never fires: time cannot reach it.
const NEVER: u64 = u64::MAX;
/// What a zero tick means; a zero divisor has no sensible reading.
const DEFAULT_TICK: Duration = Duration::from_millis(1);

/// Ticks spanned by one slot of `level`.
const fn slot_range(level: usize) -> u64 {
    1 << (SLOT_BITS * level as u32)
}

/// Ticks spanned by one full turn of `level`.
const fn level_range(level: usize) -> u64 {
    1 << (SLOT_BITS * (level as u32 + 1))
}

/// The level for a timer at tick `when` seen from tick `elapsed`: the highest
/// six-bit group in which the two differ. Below that group they share a slot,
/// so a finer level could not tell them apart.
fn level_for(elapsed: u64, when: u64) -> usize {
    // The low bits are forced on so that equal ticks still land in level 0.
    let differing = (elapsed ^ when) | (SLOTS as u64 - 1);
    let highest = 63 - differing.leading_zeros();
    ((highest / SLOT_BITS) as usize).min(TOP)
}

/// The slot of tick `when` in `level`.
fn slot_for(when: u64, level: usize) -> usize {
    ((when >> (SLOT_BITS * level as u32)) & (SLOTS as u64 - 1)) as usize
}

/// Handle of a scheduled timer; cheap to copy. A stale key (fired or
/// cancelled) is harmless: every method treats it as absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: usize,
    /// Tells this timer apart from a later one that reuses the slab index.
    generation: u64,
}

/// A hierarchical timer wheel holding values of type `T` until their deadline.
///
/// ```
/// use std::time::{Duration, Instant};
/// use udpchat::timer::TimerWheel;
///
/// let start = Instant::now();
/// let mut wheel = TimerWheel::new(start, Duration::from_millis(5));
/// let key = wheel.insert(start + Duration::from_millis(12), "retry");
///
/// // Rounded up to the next 5 ms boundary: never early.
/// assert_eq!(wheel.poll_timeout(), Some(start + Duration::from_millis(15)));
/// assert_eq!(wheel.deadline(key), Some(start + Duration::from_millis(15)));
/// assert_eq!(wheel.poll_expired(start + Duration::from_millis(14)), None);
/// assert_eq!(wheel.poll_expired(start + Duration::from_millis(15)), Some("retry"));
/// assert_eq!(wheel.poll_timeout(), None);
/// ```
pub struct TimerWheel<T> {
    /// Tick 0.
    start: Instant,
    tick_ns: u64,
    /// The tick the wheel has advanced to: every slot before it is processed.
    elapsed: u64,
    entries: Slab<Entry<T>>,
    levels: [Level; LEVELS],
    /// Timers whose tick is at or before `elapsed`, earliest first and in
    /// insertion order among equals. Everything still in `levels` is later.
    due: BinaryHeap<Reverse<Due>>,
    next_generation: u64,
    /// Records in transit during a cascade; kept to reuse its allocation.
    scratch: Vec<Record>,
    /// Slots cascaded and full re-filings, to show that jumps are cheap.
    #[cfg(test)]
    steps: u64,
}

struct Entry<T> {
    when: u64,
    generation: u64,
    value: T,
}

/// A slot's reference to an entry; stale once the generation differs.
#[derive(Clone, Copy)]
struct Record {
    index: usize,
    generation: u64,
}

/// A due record; the field order is the firing order.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    when: u64,
    generation: u64,
    index: usize,
}

/// The next slot to process and the tick at which it comes up.
#[derive(Clone, Copy)]
struct Expiration {
    level: usize,
    slot: usize,
    deadline: u64,
}

/// Most records an emptied slot keeps room for.
const SLOT_KEEP: usize = 16;
/// Most records the re-filing buffer keeps room for between uses.
const SCRATCH_KEEP: usize = 1024;

struct Level {
    level: usize,
    /// Bit `i` is set while slot `i` holds records (live or stale).
    occupied: u64,
    slots: [Slot; SLOTS],
}

struct Slot {
    records: Vec<Record>,
    /// The earliest tick of the records pushed since the slot was last
    /// emptied. Cancellation does not raise it, so it may be early, never
    /// late; it spares `poll_timeout` a look-up per record.
    earliest: u64,
}

impl Level {
    fn new(level: usize) -> Self {
        Level {
            level,
            occupied: 0,
            slots: core::array::from_fn(|_| Slot {
                records: Vec::new(),
                earliest: NEVER,
            }),
        }
    }

    fn push(&mut self, slot: usize, record: Record, when: u64) {
        let target = &mut self.slots[slot];
        target.records.push(record);
        target.earliest = target.earliest.min(when);
        self.occupied |= 1 << slot;
    }

    /// Moves a slot's records to the end of `into` and marks it empty.
    fn take(&mut self, slot: usize, into: &mut Vec<Record>) {
        let source = &mut self.slots[slot];
        into.append(&mut source.records);
        // An emptied slot gives back a large buffer: 384 slots each
        // keeping the most it ever held came to ~380 B per client.
        if source.records.capacity() > SLOT_KEEP {
            source.records = Vec::new();
        }
        source.earliest = NEVER;
        self.occupied &= !(1 << slot);
    }

    fn take_all(&mut self, into: &mut Vec<Record>) {
        while self.occupied != 0 {
            self.take(self.occupied.trailing_zeros() as usize, into);
        }
    }

    /// The occupied slots in the order the wheel reaches them from tick
    /// `elapsed`, each with the tick at which it comes up.
    fn occupied_slots(&self, elapsed: u64) -> impl Iterator<Item = (usize, u64)> + use<> {
        let level_range = level_range(self.level);
        let slot_range = slot_range(self.level);
        let level_start = elapsed & !(level_range - 1);
        let current = slot_for(elapsed, self.level);
        // Rotating puts the current slot at bit 0, so counting trailing zeros
        // walks the slots in time order, wrapping past slot 63.
        let mut pending = self.occupied.rotate_right(current as u32);
        iter::from_fn(move || {
            if pending == 0 {
                return None;
            }
            let slot = (current + pending.trailing_zeros() as usize) % SLOTS;
            pending &= pending - 1;
            let mut deadline = level_start + slot as u64 * slot_range;
            if deadline <= elapsed {
                // Only the top level wraps: this slot belongs to its next turn.
                deadline = deadline.saturating_add(level_range);
            }
            Some((slot, deadline))
        })
    }
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel. `start` is tick 0; `tick` is the resolution
    /// (a zero tick is treated as 1 ms). Never panics.
    pub fn new(start: Instant, tick: Duration) -> Self {
        let tick = if tick.is_zero() { DEFAULT_TICK } else { tick };
        TimerWheel {
            start,
            tick_ns: u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX),
            elapsed: 0,
            entries: Slab::new(),
            levels: core::array::from_fn(Level::new),
            due: BinaryHeap::new(),
            next_generation: 0,
            scratch: Vec::new(),
            #[cfg(test)]
            steps: 0,
        }
    }

    /// The resolution: every deadline is rounded up to a multiple of it.
    pub fn tick(&self) -> Duration {
        Duration::from_nanos(self.tick_ns)
    }

    /// Schedules `value` at `deadline`, rounded up to the next tick boundary
    /// so it never fires early. A deadline at or before the wheel's current
    /// tick fires on the next [`poll_expired`](Self::poll_expired). Deadlines
    /// beyond the top level's reach are parked there and cascade again; one
    /// too far to count in `u64` ticks never fires.
    pub fn insert(&mut self, deadline: Instant, value: T) -> TimerKey {
        let when = self.tick_ceil(deadline);
        let generation = self.next_generation;
        // A u64 counter outlives any process; wrapping only avoids a panic.
        self.next_generation = self.next_generation.wrapping_add(1);
        let index = self.entries.insert(Entry {
            when,
            generation,
            value,
        });
        let record = Record { index, generation };
        if when != NEVER {
            self.place(record, when);
        }
        TimerKey { index, generation }
    }

    /// Cancels a timer and returns its value if it was still pending. O(1):
    /// the record left in the wheel is dropped when its slot comes up.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        self.take_live(key.index, key.generation)
    }

    /// The earliest instant at which [`poll_expired`](Self::poll_expired)
    /// may return something (a tick boundary), or `None` when no timer is
    /// pending or the next one never fires.
    ///
    /// It is early only when cancelled timers have not been cleaned out yet.
    /// After `poll_expired(now)` has returned `None`, it is `None` or strictly
    /// later than `now`, so a driver that sleeps until it cannot spin.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.entries.is_empty() {
            return None;
        }
        // Due records are all at or before `elapsed`, so before any slot.
        let mut earliest = self.due.peek().map_or(NEVER, |Reverse(due)| due.when);
        // Levels and their slots are visited in time order, and a slot holds
        // no timer earlier than the tick at which it comes up; once a slot
        // comes up no earlier than the best timer found, none later can beat
        // it. Usually that is the first slot visited; a parked far-future
        // timer is why there can be more.
        'levels: for level in &self.levels {
            for (slot, deadline) in level.occupied_slots(self.elapsed) {
                if deadline >= earliest {
                    break 'levels;
                }
                earliest = earliest.min(level.slots[slot].earliest);
            }
        }
        self.instant_at(earliest)
    }

    /// Removes and returns one value whose rounded deadline is at or before
    /// `now`, earliest deadline first and in insertion order among equal
    /// deadlines; `None` when nothing is due. `now` may jump far ahead
    /// cheaply; a `now` earlier than a previous one makes no progress.
    #[must_use]
    pub fn poll_expired(&mut self, now: Instant) -> Option<T> {
        let now = self.tick_floor(now);
        if now.saturating_sub(self.elapsed) >= level_range(TOP) {
            // Every slot is due: re-file everything in one pass rather than
            // cascade the top level once per turn between here and `now`.
            self.refile_all(now);
        }
        loop {
            if let Some(value) = self.pop_due(now) {
                return Some(value);
            }
            match self.next_expiration() {
                Some(expiration) if expiration.deadline <= now => self.cascade(expiration),
                _ => {
                    // No slot comes up by `now`, so skipping there moves no
                    // timer out of place.
                    self.elapsed = self.elapsed.max(now);
                    return None;
                }
            }
        }
    }

    /// The earliest live timer: its rounded deadline and its value (ties in
    /// no particular order). A pass over every live timer: for logs and
    /// tests, not for every loop turn (that is
    /// [`poll_timeout`](Self::poll_timeout)).
    pub fn peek(&self) -> Option<(Instant, &T)> {
        let (when, value) = (self.entries.iter())
            .map(|(_, e)| (e.when, &e.value))
            .min_by_key(|(when, _)| *when)?;
        Some((self.instant_at(when)?, value))
    }

    /// Number of live timers: neither fired nor cancelled.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no timer is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The rounded deadline a live timer fires at; `None` for a stale key
    /// or a deadline that never fires.
    pub fn deadline(&self, key: TimerKey) -> Option<Instant> {
        let entry = self.entries.get(key.index)?;
        if entry.generation != key.generation {
            return None;
        }
        self.instant_at(entry.when)
    }

    /// Files a record by its tick: in the due queue if the wheel has reached
    /// it, else in the slot that comes up first at or before it.
    fn place(&mut self, record: Record, when: u64) {
        if when <= self.elapsed {
            self.due.push(Reverse(Due {
                when,
                generation: record.generation,
                index: record.index,
            }));
            return;
        }
        // The farthest tick the top level can hold without wrapping onto its
        // current slot, which must stay empty for the wheel's time order.
        let top_slot_start = self.elapsed & !(slot_range(TOP) - 1);
        let horizon = top_slot_start.saturating_add(level_range(TOP) - 1);
        let at = when.min(horizon);
        let level = level_for(self.elapsed, at);
        self.levels[level].push(slot_for(at, level), record, when);
    }

    /// Pops the earliest due value with a tick at or before `now`,
    /// discarding stale records on the way.
    fn pop_due(&mut self, now: u64) -> Option<T> {
        loop {
            let top = self.due.peek_mut()?;
            if top.0.when > now {
                return None;
            }
            let Reverse(due) = PeekMut::pop(top);
            if let Some(value) = self.take_live(due.index, due.generation) {
                return Some(value);
            }
        }
    }

    fn take_live(&mut self, index: usize, generation: u64) -> Option<T> {
        match self.entries.get(index) {
            Some(entry) if entry.generation == generation => {
                self.entries.try_remove(index).map(|entry| entry.value)
            }
            _ => None,
        }
    }

    /// The first slot to come up: levels are in time order, since a level's
    /// slots all lie within the current slot of the level above.
    fn next_expiration(&self) -> Option<Expiration> {
        self.levels.iter().enumerate().find_map(|(level, wheel)| {
            let (slot, deadline) = wheel.occupied_slots(self.elapsed).next()?;
            Some(Expiration {
                level,
                slot,
                deadline,
            })
        })
    }

    /// Advances to a slot and re-files its records relative to the new
    /// tick: down a level, or into the due queue.
    fn cascade(&mut self, expiration: Expiration) {
        #[cfg(test)]
        {
            self.steps += 1;
        }
        self.elapsed = expiration.deadline;
        let mut batch = mem::take(&mut self.scratch);
        self.levels[expiration.level].take(expiration.slot, &mut batch);
        self.refile(&mut batch);
        batch.shrink_to(SCRATCH_KEEP);
        self.scratch = batch;
    }

    /// Advances straight to `now` and re-files every record; the due queue
    /// sorts whatever that makes due.
    fn refile_all(&mut self, now: u64) {
        #[cfg(test)]
        {
            self.steps += 1;
        }
        let mut batch = mem::take(&mut self.scratch);
        for level in &mut self.levels {
            level.take_all(&mut batch);
        }
        self.elapsed = now;
        self.refile(&mut batch);
        batch.shrink_to(SCRATCH_KEEP);
        self.scratch = batch;
    }

    fn refile(&mut self, batch: &mut Vec<Record>) {
        for record in batch.drain(..) {
            // Stale records (cancelled or fired) are dropped here.
            if let Some(entry) = self.entries.get(record.index)
                && entry.generation == record.generation
            {
                let when = entry.when;
                self.place(record, when);
            }
        }
    }

    /// Whole ticks from `start` to `deadline`, rounded up.
    fn tick_ceil(&self, deadline: Instant) -> u64 {
        let ns = deadline.saturating_duration_since(self.start).as_nanos();
        u64::try_from(ns.div_ceil(u128::from(self.tick_ns))).unwrap_or(NEVER)
    }

    /// Whole ticks from `start` to `now`, rounded down: a tick is reached
    /// only once its boundary has passed.
    fn tick_floor(&self, now: Instant) -> u64 {
        let ns = now.saturating_duration_since(self.start).as_nanos();
        u64::try_from(ns / u128::from(self.tick_ns))
            .unwrap_or(NEVER)
            .min(NEVER - 1)
    }

    /// The instant of a tick boundary; `None` if it is out of `Instant`'s
    /// range or never.
    fn instant_at(&self, tick: u64) -> Option<Instant> {
        if tick == NEVER {
            return None;
        }
        let ns = u128::from(tick) * u128::from(self.tick_ns);
        let secs = u64::try_from(ns / 1_000_000_000).ok()?;
        let nanos = u32::try_from(ns % 1_000_000_000).ok()?;
        self.start.checked_add(Duration::new(secs, nanos))
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("tick", &self.tick())
            .field("elapsed_ticks", &self.elapsed)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TICK: Duration = Duration::from_millis(5);

    /// A start with room before it, for deadlines in the past.
    fn anchor() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain<T>(wheel: &mut TimerWheel<T>, now: Instant) -> Vec<T> {
        iter::from_fn(|| wheel.poll_expired(now)).collect()
    }

    impl<T> TimerWheel<T> {
        /// Records still held anywhere in the wheel, stale ones included.
        fn records(&self) -> usize {
            let in_slots: usize = self
                .levels
                .iter()
                .flat_map(|level| level.slots.iter())
                .map(|slot| slot.records.len())
                .sum();
            in_slots + self.due.len()
        }
    }

    #[test]
    fn peek_gives_the_earliest_live_timer_and_its_value() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        assert!(wheel.peek().is_none());
        let soon = wheel.insert(start + ms(7), "soon");
        wheel.insert(start + Duration::from_secs(90_000), "far");
        wheel.insert(start + ms(40), "later");
        assert_eq!(wheel.peek(), Some((start + ms(10), &"soon")));
        // A cancelled one is not it, though poll_timeout may still say so.
        wheel.cancel(soon);
        assert_eq!(wheel.peek(), Some((start + ms(40), &"later")));
        assert!(wheel.poll_timeout().is_some_and(|t| t <= start + ms(40)));
        assert_eq!(drain(&mut wheel, start + ms(40)), ["later"]);
        assert_eq!(wheel.peek().map(|p| *p.1), Some("far"));
    }

    #[test]
    fn deadlines_round_up_to_the_next_tick() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let between = wheel.insert(start + ms(7), "between");
        let on = wheel.insert(start + ms(10), "on");
        let just_after = wheel.insert(start + ms(10) + Duration::from_nanos(1), "just after");

        assert_eq!(wheel.deadline(between), Some(start + ms(10)));
        assert_eq!(wheel.deadline(on), Some(start + ms(10)));
        assert_eq!(wheel.deadline(just_after), Some(start + ms(15)));
        assert_eq!(wheel.poll_timeout(), Some(start + ms(10)));

        // Never early: not at the unrounded deadline, not a nanosecond short.
        assert_eq!(wheel.poll_expired(start + ms(7)), None);
        let almost = start + ms(10) - Duration::from_nanos(1);
        assert_eq!(wheel.poll_expired(almost), None);
        assert_eq!(drain(&mut wheel, start + ms(10)), ["between", "on"]);
        assert_eq!(wheel.poll_timeout(), Some(start + ms(15)));
        assert_eq!(drain(&mut wheel, start + ms(15)), ["just after"]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn zero_tick_is_one_millisecond() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, Duration::ZERO);
        assert_eq!(wheel.tick(), ms(1));
        let key = wheel.insert(start + Duration::from_micros(1500), ());
        assert_eq!(wheel.deadline(key), Some(start + ms(2)));
    }

    #[test]
    fn fires_earliest_first_across_levels_and_ties_in_insertion_order() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        // Ticks chosen to land in levels 0 to 3.
        let ticks = [5000u64, 3, 100, 70, 3, 300_000, 64, 100, 4096, 63];
        for (id, tick) in ticks.iter().enumerate() {
            let _ = wheel.insert(start + TICK * *tick as u32, id);
        }
        let mut expected: Vec<usize> = (0..ticks.len()).collect();
        expected.sort_by_key(|&id| (ticks[id], id));

        let mut fired = Vec::new();
        while let Some(next) = wheel.poll_timeout() {
            fired.extend(drain(&mut wheel, next));
        }
        assert_eq!(fired, expected);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_poll_in_deadline_order() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        assert_eq!(wheel.poll_expired(start + ms(100)), None);

        let _ = wheel.insert(start + ms(50), "past");
        let _ = wheel.insert(start - ms(1), "before start");
        let _ = wheel.insert(start + ms(100), "now");
        let _ = wheel.insert(start + ms(101), "next tick");
        assert_eq!(wheel.poll_timeout(), Some(start));
        assert_eq!(
            drain(&mut wheel, start + ms(100)),
            ["before start", "past", "now"]
        );
        assert_eq!(wheel.poll_timeout(), Some(start + ms(105)));
    }

    #[test]
    fn cancel_returns_the_value_once_and_it_never_fires() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let keep = wheel.insert(start + ms(20), "keep");
        let drop = wheel.insert(start + ms(10), "drop");
        assert_eq!(wheel.len(), 2);

        assert_eq!(wheel.cancel(drop), Some("drop"));
        assert_eq!(wheel.cancel(drop), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(drain(&mut wheel, start + ms(1000)), ["keep"]);
        assert_eq!(wheel.cancel(keep), None);
        assert!(wheel.is_empty());
        assert_eq!(wheel.poll_timeout(), None);
    }

    #[test]
    fn stale_keys_are_harmless_even_when_the_index_is_reused() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let fired = wheel.insert(start + ms(5), 1);
        assert_eq!(drain(&mut wheel, start + ms(5)), [1]);
        assert_eq!(wheel.cancel(fired), None);
        assert_eq!(wheel.deadline(fired), None);

        let cancelled = wheel.insert(start + ms(50), 2);
        assert_eq!(wheel.cancel(cancelled), Some(2));
        let reused = wheel.insert(start + ms(50), 3);
        assert_eq!(reused.index, cancelled.index, "the slab reuses the index");

        assert_eq!(wheel.deadline(cancelled), None);
        assert_eq!(wheel.cancel(cancelled), None);
        assert_eq!(wheel.deadline(reused), Some(start + ms(50)));
        // The stale record shares the slot with the live one: it must not
        // fire the new value twice or under the old key.
        assert_eq!(drain(&mut wheel, start + ms(50)), [3]);
        assert_eq!(wheel.records(), 0);
    }

    #[test]
    fn cancelled_records_are_dropped_when_their_slot_passes() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let keys: Vec<_> = (0..1000u32)
            .map(|i| wheel.insert(start + ms(500) + TICK * (i % 300), i))
            .collect();
        for key in keys {
            assert!(wheel.cancel(key).is_some());
        }
        assert_eq!(wheel.records(), 1000, "cancellation is lazy");
        assert_eq!(wheel.poll_timeout(), None, "nothing live to wait for");

        // One live timer beyond them all: reaching it passes every slot.
        let _ = wheel.insert(start + ms(5000), 1000);
        assert_eq!(drain(&mut wheel, start + ms(5000)), [1000]);
        assert_eq!(wheel.records(), 0);
    }

    #[test]
    fn poll_timeout_is_later_than_now_after_a_drain() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let mut keys = Vec::new();
        for i in 0..200u32 {
            keys.push(wheel.insert(start + Duration::from_micros(u64::from(i) * 3_700), i));
        }
        // Cancelled timers leave stale records that may make poll_timeout
        // early — but never at or before a `now` that was just drained.
        for key in keys.iter().step_by(3) {
            let _ = wheel.cancel(*key);
        }
        let mut now = start;
        for _ in 0..1000 {
            while wheel.poll_expired(now).is_some() {}
            match wheel.poll_timeout() {
                Some(wake) => assert!(wake > now, "{wake:?} is not after {now:?}"),
                None => break,
            }
            // Mid-tick instants, as a real clock delivers them.
            now += Duration::from_micros(1_300);
        }
        assert!(wheel.is_empty());
        assert_eq!(wheel.poll_timeout(), None);
    }

    #[test]
    fn now_going_backwards_fires_nothing_early() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let _ = wheel.insert(start + ms(10), "a");
        let _ = wheel.insert(start + ms(20), "b");
        let _ = wheel.insert(start + ms(30), "c");
        assert_eq!(wheel.poll_expired(start + ms(20)), Some("a"));
        // "b" is due but not taken yet; time then appears to go back.
        assert_eq!(wheel.poll_expired(start + ms(15)), None);
        assert_eq!(wheel.poll_expired(start - ms(15)), None);
        assert_eq!(wheel.poll_timeout(), Some(start + ms(20)));
        assert_eq!(wheel.poll_expired(start + ms(25)), Some("b"));
        assert_eq!(wheel.poll_expired(start + ms(25)), None);
        assert_eq!(drain(&mut wheel, start + ms(30)), ["c"]);
    }

    #[test]
    fn a_huge_jump_costs_one_step_per_occupied_slot() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let ticks = [1u32, 1_000, 250_000, 9_999_999, 10_000_001];
        for tick in ticks {
            let _ = wheel.insert(start + TICK * tick, tick);
        }
        let jump = start + TICK * 10_000_000;
        assert_eq!(drain(&mut wheel, jump), [1, 1_000, 250_000, 9_999_999]);
        // Four timers cascade through at most six levels each; stepping
        // tick by tick would take ten million steps.
        assert!(wheel.steps <= 4 * LEVELS as u64, "{} steps", wheel.steps);
        assert_eq!(wheel.poll_timeout(), Some(start + TICK * 10_000_001));
    }

    #[test]
    fn far_future_deadlines_fire_exactly_on_time() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let year = Duration::from_secs(365 * 24 * 3600);
        // The top level reaches about 10.9 years of 5 ms ticks.
        let reach = TICK * (1 << 30) * 64;
        let near = start + ms(5);
        let beyond = start + reach + ms(7);
        let century = start + year * 100 + ms(2);
        let _ = wheel.insert(century, "century");
        let _ = wheel.insert(beyond, "beyond");
        let _ = wheel.insert(near, "near");

        assert_eq!(drain(&mut wheel, near), ["near"]);
        let beyond_rounded = start + reach + ms(10);
        assert_eq!(wheel.poll_timeout(), Some(beyond_rounded));
        assert_eq!(
            wheel.poll_expired(beyond_rounded - Duration::from_nanos(1)),
            None
        );
        assert_eq!(wheel.poll_timeout(), Some(beyond_rounded));
        assert_eq!(drain(&mut wheel, beyond_rounded), ["beyond"]);

        // A simulator jumping from wake-up to wake-up meets no early ones.
        let century_rounded = start + year * 100 + ms(5);
        assert_eq!(wheel.poll_timeout(), Some(century_rounded));
        assert_eq!(
            wheel.poll_expired(century_rounded - Duration::from_nanos(1)),
            None
        );
        assert_eq!(drain(&mut wheel, century_rounded), ["century"]);
        assert!(wheel.steps < 200, "{} steps", wheel.steps);
    }

    #[test]
    fn a_jump_over_many_top_level_turns_refiles_once() {
        let start = anchor();
        let mut wheel = TimerWheel::new(start, TICK);
        let turns = |n: u32| TICK * (1 << 30) * 64 * n;
        let _ = wheel.insert(start + turns(1 << 14) + ms(3), "later");
        let _ = wheel.insert(start + turns(1 << 12), "sooner");
        // Cascading the top level once per turn would take thousands of steps.
        let end = start + turns(1 << 14) + ms(5);
        assert_eq!(drain(&mut wheel, end), ["sooner", "later"]);
        assert!(wheel.steps <= 4, "{} steps", wheel.steps);
    }

    #[test]
    fn a_deadline_past_the_tick_counter_never_fires_but_can_be_cancelled() {
        let start = anchor();
        // With 1 ns ticks, u64 ticks run out after about 584 years.
        let mut wheel = TimerWheel::new(start, Duration::from_nanos(1));
        let Some(far) = start.checked_add(Duration::from_secs(1000 * 365 * 24 * 3600)) else {
            return; // This platform's Instant cannot even express it.
        };
        let key = wheel.insert(far, "never");
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.deadline(key), None);
        assert_eq!(wheel.poll_timeout(), None);
        assert_eq!(wheel.poll_expired(far), None);
        assert_eq!(wheel.cancel(key), Some("never"));
    }

    use crate::test_rng::Rng;

    /// `start` shifted by a signed number of nanoseconds.
    fn offset(start: Instant, ns: i128) -> Instant {
        let magnitude = ns.unsigned_abs();
        let span = Duration::new(
            u64::try_from(magnitude / 1_000_000_000).unwrap(),
            u32::try_from(magnitude % 1_000_000_000).unwrap(),
        );
        if ns >= 0 { start + span } else { start - span }
    }

    /// Runs random inserts, cancels and clock moves against a sorted map of
    /// the live timers. Every poll must return exactly the model's earliest
    /// timer (deadline, then insertion order) if it is due, and nothing
    /// otherwise: so each value fires once, never early, and at the first
    /// poll that reaches its rounded deadline.
    fn model_test(seed: u64, tick: Duration, cancels: bool) {
        let start = anchor();
        let tick_ns = tick.as_nanos() as i128;
        let mut rng = Rng(seed);
        let mut wheel = TimerWheel::new(start, tick);
        // Live timers by (rounded tick, insertion number) → id.
        let mut model: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        let mut keys: Vec<(TimerKey, (u64, u64))> = Vec::new();
        let mut stale: Vec<TimerKey> = Vec::new();
        let mut now_ns: i128 = 0;
        let mut inserted = 0u64;
        let mut fired = 0u64;

        for _ in 0..20_000 {
            match rng.below(100) {
                0..45 => {
                    let ticks_ahead = match rng.below(100) {
                        0..50 => rng.below(200),
                        50..75 => rng.below(5_000),
                        75..90 => rng.below(1 << 24),
                        90..95 => (1 << 36) + rng.below(1 << 38),
                        _ => 0,
                    };
                    let mut deadline_ns = now_ns
                        + ticks_ahead as i128 * tick_ns
                        + rng.below(2 * tick_ns as u64) as i128;
                    if ticks_ahead == 0 {
                        // In the past, sometimes before the start.
                        deadline_ns -= rng.below(300 * tick_ns as u64) as i128;
                    }
                    let rounded = if deadline_ns <= 0 {
                        0
                    } else {
                        u64::try_from((deadline_ns + tick_ns - 1) / tick_ns).unwrap()
                    };
                    let id = inserted;
                    inserted += 1;
                    let key = wheel.insert(offset(start, deadline_ns), id);
                    assert_eq!(
                        wheel.deadline(key),
                        Some(offset(start, i128::from(rounded) * tick_ns))
                    );
                    model.insert((rounded, id), id);
                    keys.push((key, (rounded, id)));
                }
                45..60 if cancels && !keys.is_empty() => {
                    let pick = rng.below(keys.len() as u64) as usize;
                    let (key, slot) = keys.swap_remove(pick);
                    let expected = model.remove(&slot);
                    assert_eq!(wheel.cancel(key), expected);
                    assert_eq!(wheel.deadline(key), None);
                    stale.push(key);
                }
                45..60 if !stale.is_empty() => {
                    let key = stale[rng.below(stale.len() as u64) as usize];
                    assert_eq!(wheel.cancel(key), None);
                    assert_eq!(wheel.deadline(key), None);
                }
                45..60 => {}
                _ => {
                    now_ns = match rng.below(100) {
                        0..60 => now_ns + rng.below(3 * tick_ns as u64) as i128,
                        60..85 => now_ns + rng.below(300 * tick_ns as u64) as i128,
                        85..92 => now_ns + rng.below((1 << 22) * tick_ns as u64) as i128,
                        92..97 => match wheel.poll_timeout() {
                            // Jump like a simulator: straight to the next wake-up.
                            Some(wake) if wake > offset(start, now_ns) => {
                                wake.duration_since(start).as_nanos() as i128
                            }
                            _ => now_ns,
                        },
                        97..99 => now_ns + (1 << 37) * tick_ns,
                        _ => now_ns - rng.below(100 * tick_ns as u64) as i128,
                    };
                    let now = offset(start, now_ns);
                    // Usually drain; sometimes take a single value and leave
                    // the rest due for later polls.
                    let polls = if rng.below(4) == 0 { 1 } else { usize::MAX };
                    let mut drained = false;
                    for _ in 0..polls {
                        let got = wheel.poll_expired(now);
                        let due = model
                            .first_key_value()
                            .filter(|((rounded, _), _)| i128::from(*rounded) * tick_ns <= now_ns)
                            .map(|(slot, id)| (*slot, *id));
                        assert_eq!(got, due.map(|(_, id)| id), "poll at {now_ns} ns");
                        let Some((slot, _)) = due else {
                            drained = true;
                            break;
                        };
                        model.remove(&slot);
                        let at = keys.iter().position(|(_, s)| *s == slot).unwrap();
                        stale.push(keys.swap_remove(at).0);
                        fired += 1;
                    }
                    if drained {
                        let wake = wheel.poll_timeout();
                        if let Some(wake) = wake {
                            assert!(wake > now, "busy loop: wake {wake:?} at now {now:?}");
                        }
                        let next = model
                            .first_key_value()
                            .map(|((rounded, _), _)| offset(start, i128::from(*rounded) * tick_ns));
                        match (wake, next) {
                            (Some(wake), Some(next)) if cancels => assert!(wake <= next),
                            _ => assert_eq!(wake, next, "exact without cancellations"),
                        }
                    }
                }
            }
            assert_eq!(wheel.len(), model.len());
            stale.truncate(1_000);
        }

        // Everything left fires, in order, by the end of time.
        let end = offset(start, now_ns + (1 << 40) * tick_ns);
        let rest = drain(&mut wheel, end);
        let expected: Vec<u64> = model.values().copied().collect();
        assert_eq!(rest, expected);
        assert!(wheel.is_empty());
        assert_eq!(wheel.records(), 0, "no stale record outlives its slot");
        assert!(fired > 1_000, "the test must exercise firing ({fired})");
    }

    #[test]
    fn model_with_five_millisecond_ticks() {
        model_test(1, TICK, true);
        model_test(2, TICK, true);
    }

    #[test]
    fn model_with_nanosecond_ticks() {
        model_test(3, Duration::from_nanos(1), true);
    }

    #[test]
    fn model_with_an_odd_tick() {
        model_test(4, Duration::new(0, 3_000_007), true);
    }

    #[test]
    fn model_without_cancellation_has_exact_timeouts() {
        model_test(5, TICK, false);
        model_test(6, Duration::from_nanos(1), false);
    }
}
