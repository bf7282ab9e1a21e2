//! Sans-IO update protocol shared by the publisher and the agent: no network, no disk, no async.
