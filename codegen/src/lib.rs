//! # qvc-codegen: PTX generation (empty until the PTX/emulator issue)
//!
//! This crate will own the typed PTX builder, the printer, the PTX emulator and
//! the optional `ptxas` check (see `DESIGN.md`). It deliberately holds no code
//! yet: the CPU path does not need it, and an empty crate cannot pretend to work.
