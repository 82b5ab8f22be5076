//! What a waiter of this process holds on the server while it waits for a key that another
//! process has: shared advisory locks in the two-`int4` key space, on numbers derived from the
//! key's advisory key ([`super::key_hash`]):
//!
//! * the **waiter flag**: a release that finds it held sends `pg_notify` (waiters of both
//!   sides set it);
//! * the **writer-waiting mark**: an exclusive acquire waits; new readers stay out;
//! * the **readers' turn mark**: a shared acquire waits that found the key held exclusively;
//!   the next writer stays out until those readers are in.

use std::ops::{BitAnd, BitOr, Sub};

/// A set of the three marks.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub(crate) struct Marks(u8);

impl Marks {
    pub(crate) const NONE: Marks = Marks(0);
    /// The waiter flag.
    pub(crate) const FLAG: Marks = Marks(1);
    /// The writer-waiting mark.
    pub(crate) const WRITER_WAITING: Marks = Marks(2);
    /// The readers' turn mark.
    pub(crate) const READERS_TURN: Marks = Marks(4);

    /// Whether every mark of `other` is in this set.
    pub(crate) fn contains(self, other: Marks) -> bool {
        self.0 & other.0 == other.0
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// (waiter flag, writer-waiting mark, readers' turn mark): the statements' parameters.
    pub(crate) fn as_params(self) -> (bool, bool, bool) {
        (
            self.contains(Marks::FLAG),
            self.contains(Marks::WRITER_WAITING),
            self.contains(Marks::READERS_TURN),
        )
    }

    /// The marks whose answer in a statement's three columns is `Some(true)`.
    pub(crate) fn from_answers(answers: (Option<bool>, Option<bool>, Option<bool>)) -> Marks {
        let mut marks = Marks::NONE;
        for (answer, mark) in [
            (answers.0, Marks::FLAG),
            (answers.1, Marks::WRITER_WAITING),
            (answers.2, Marks::READERS_TURN),
        ] {
            if answer == Some(true) {
                marks = marks | mark;
            }
        }
        marks
    }
}

impl BitOr for Marks {
    type Output = Marks;
    fn bitor(self, other: Marks) -> Marks {
        Marks(self.0 | other.0)
    }
}

impl BitAnd for Marks {
    type Output = Marks;
    fn bitand(self, other: Marks) -> Marks {
        Marks(self.0 & other.0)
    }
}

impl Sub for Marks {
    type Output = Marks;
    fn sub(self, other: Marks) -> Marks {
        Marks(self.0 & !other.0)
    }
}
