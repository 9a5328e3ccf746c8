//! The PTX emulator (being written).
