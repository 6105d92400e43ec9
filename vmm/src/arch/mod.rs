//! Architecture support: the x86-64 guest layout, CPU set-up and boot protocols.

pub mod x86_64;
