//! The self-contained sandbox behind `update-agent demo`: a GPT disk image file, keys, a signed
//! update served by server-mock over loopback, reboots through the boot simulator.

pub mod demo;
pub mod disk_image;
pub mod world;
