//! Test harness for booting the aiodma test guest.
