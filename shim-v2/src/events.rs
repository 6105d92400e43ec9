//! Task events to containerd, in order, from one thread: handlers and
//! process waiters queue them and never block on containerd.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;

/// How long one publish may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The environment variable containerd gives its shims its ttrpc address in
/// (the framework's constant is private).
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    ts
}

/// One event for containerd.
#[derive(Clone)]
pub enum Event {
    Create {
        id: String,
        bundle: String,
        pid: u32,
        stdin: String,
        stdout: String,
        stderr: String,
        terminal: bool,
    },
    Start {
        id: String,
        pid: u32,
    },
    Exit {
        id: String,
        exec_id: String,
        pid: u32,
        status: u32,
        at: SystemTime,
    },
    Delete {
        id: String,
        pid: u32,
        status: u32,
        at: SystemTime,
    },
    ExecAdded {
        id: String,
        exec_id: String,
    },
    ExecStarted {
        id: String,
        exec_id: String,
        pid: u32,
    },
    Oom {
        id: String,
    },
    Paused {
        id: String,
    },
    Resumed {
        id: String,
    },
}

impl Event {
    /// The topic and the protobuf message.
    pub fn into_message(self) -> (&'static str, Box<dyn MessageDyn>) {
        match self {
            Event::Create {
                id,
                bundle,
                pid,
                stdin,
                stdout,
                stderr,
                terminal,
            } => {
                let mut io = TaskIO::new();
                io.stdin = stdin;
                io.stdout = stdout;
                io.stderr = stderr;
                io.terminal = terminal;
                let mut e = TaskCreate::new();
                e.container_id = id;
                e.bundle = bundle;
                e.pid = pid;
                e.io = Some(io).into();
                (topics::TASK_CREATE_EVENT_TOPIC, Box::new(e))
            }
            Event::Start { id, pid } => {
                let mut e = TaskStart::new();
                e.container_id = id;
                e.pid = pid;
                (topics::TASK_START_EVENT_TOPIC, Box::new(e))
            }
            Event::Exit {
                id,
                exec_id,
                pid,
                status,
                at,
            } => {
                let mut e = TaskExit::new();
                // containerd names the process by `id`: the container id
                // for the init, the exec id for an exec.
                e.id = if exec_id.is_empty() {
                    id.clone()
                } else {
                    exec_id
                };
                e.container_id = id;
                e.pid = pid;
                e.exit_status = status;
                e.exited_at = Some(timestamp(at)).into();
                (topics::TASK_EXIT_EVENT_TOPIC, Box::new(e))
            }
            Event::Delete {
                id,
                pid,
                status,
                at,
            } => {
                let mut e = TaskDelete::new();
                e.id = id.clone();
                e.container_id = id;
                e.pid = pid;
                e.exit_status = status;
                e.exited_at = Some(timestamp(at)).into();
                (topics::TASK_DELETE_EVENT_TOPIC, Box::new(e))
            }
            Event::ExecAdded { id, exec_id } => {
                let mut e = TaskExecAdded::new();
                e.container_id = id;
                e.exec_id = exec_id;
                (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e))
            }
            Event::ExecStarted { id, exec_id, pid } => {
                let mut e = TaskExecStarted::new();
                e.container_id = id;
                e.exec_id = exec_id;
                e.pid = pid;
                (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e))
            }
            Event::Oom { id } => {
                let mut e = TaskOOM::new();
                e.container_id = id;
                (topics::TASK_OOM_EVENT_TOPIC, Box::new(e))
            }
            Event::Paused { id } => {
                let mut e = TaskPaused::new();
                e.container_id = id;
                (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e))
            }
            Event::Resumed { id } => {
                let mut e = TaskResumed::new();
                e.container_id = id;
                (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e))
            }
        }
    }
}

/// Publishes one event. The connection to containerd dies when containerd
/// restarts: a failed publish connects again (to `address`) and tries once
/// more. An event containerd cannot take is dropped, logged: a containerd
/// that starts again asks every task's state itself.
fn publish(
    publisher: &mut Option<RemotePublisher>,
    address: Option<&str>,
    namespace: &str,
    ev: Event,
) {
    for attempt in 1..=2 {
        if publisher.is_none() {
            *publisher = address.and_then(|a| {
                RemotePublisher::new(a)
                    .map_err(|e| log::warn!("connecting to containerd at {a}: {e}"))
                    .ok()
            });
        }
        let Some(p) = publisher.as_ref() else {
            break;
        };
        let (topic, msg) = ev.clone().into_message();
        let ctx = containerd_shim::protos::ttrpc::context::with_timeout(
            i64::try_from(PUBLISH_TIMEOUT.as_nanos()).unwrap_or(i64::MAX),
        );
        match p.publish(ctx, topic, namespace, msg) {
            Ok(()) => return,
            Err(e) => {
                log::warn!("publishing {topic} (attempt {attempt}): {e}");
                *publisher = None;
            }
        }
    }
    log::warn!("an event is lost: containerd does not take it");
}

/// The queue to the publishing thread.
pub struct Events {
    tx: Mutex<Sender<Event>>,
}

impl Events {
    /// Starts the thread that forwards events to containerd for
    /// `namespace`.
    pub fn start(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, rx) = channel::<Event>();
        let address = std::env::var(TTRPC_ADDRESS).ok();
        let spawned = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut publisher = Some(publisher);
                for ev in rx {
                    publish(&mut publisher, address.as_deref(), &namespace, ev);
                }
            });
        if let Err(e) = spawned {
            log::error!("starting the events thread: {e}; events are lost");
        }
        Events { tx: Mutex::new(tx) }
    }

    pub fn send(&self, ev: Event) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.send(ev).is_err() {
            log::warn!("the events thread is gone; an event is lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::api::{Empty, ForwardRequest};
    use containerd_shim::protos::{create_events, ttrpc, Events as EventsService};
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    /// containerd's event service, recording the topics it is given.
    struct FakeContainerd(Arc<Mutex<Vec<String>>>);

    impl EventsService for FakeContainerd {
        fn forward(&self, _: &ttrpc::TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
            self.0
                .lock()
                .unwrap()
                .push(req.envelope().topic().to_string());
            Ok(Empty::default())
        }
    }

    fn containerd(path: &std::path::Path, seen: &Arc<Mutex<Vec<String>>>) -> ttrpc::Server {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let service: Arc<dyn EventsService + Send + Sync> = Arc::new(FakeContainerd(seen.clone()));
        let mut server = ttrpc::Server::new()
            .add_listener(listener.into_raw_fd())
            .unwrap()
            .register_service(create_events(service));
        server.start().unwrap();
        server
    }

    #[test]
    fn events_reach_a_restarted_containerd() {
        let dir = std::env::temp_dir().join(format!("husk-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ttrpc.sock");
        let address = path.to_str().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let first = containerd(&path, &seen);
        let mut publisher = Some(RemotePublisher::new(address).unwrap());
        publish(
            &mut publisher,
            Some(address),
            "ns",
            Event::Oom { id: "c".into() },
        );
        assert_eq!(*seen.lock().unwrap(), ["/tasks/oom"]);

        // containerd stops: the event is dropped, in bounded time.
        first.shutdown();
        std::fs::remove_file(&path).unwrap();
        let t = std::time::Instant::now();
        publish(
            &mut publisher,
            Some(address),
            "ns",
            Event::Paused { id: "c".into() },
        );
        assert!(t.elapsed() < PUBLISH_TIMEOUT * 3);
        assert_eq!(seen.lock().unwrap().len(), 1);

        // containerd is back on the same address: the next event reaches it.
        let second = containerd(&path, &seen);
        publish(
            &mut publisher,
            Some(address),
            "ns",
            Event::Resumed { id: "c".into() },
        );
        assert_eq!(*seen.lock().unwrap(), ["/tasks/oom", "/tasks/resumed"]);
        second.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exit_events_name_the_process() {
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let (topic, msg) = Event::Exit {
            id: "c1".into(),
            exec_id: "e1".into(),
            pid: 42,
            status: 137,
            at,
        }
        .into_message();
        assert_eq!(topic, "/tasks/exit");
        let e = msg.downcast_box::<TaskExit>().unwrap();
        assert_eq!((e.container_id.as_str(), e.id.as_str()), ("c1", "e1"));
        assert_eq!((e.pid, e.exit_status), (42, 137));
        assert_eq!(e.exited_at.seconds, 1_700_000_000);
        assert_eq!(e.exited_at.nanos, 5);
        let (_, msg) = Event::Exit {
            id: "c1".into(),
            exec_id: String::new(),
            pid: 42,
            status: 0,
            at,
        }
        .into_message();
        assert_eq!(msg.downcast_box::<TaskExit>().unwrap().id, "c1");
    }

    #[test]
    fn topics() {
        let t = |e: Event| e.into_message().0;
        assert_eq!(t(Event::Oom { id: "c".into() }), "/tasks/oom");
        assert_eq!(t(Event::Paused { id: "c".into() }), "/tasks/paused");
        assert_eq!(t(Event::Resumed { id: "c".into() }), "/tasks/resumed");
        assert_eq!(
            t(Event::ExecAdded {
                id: "c".into(),
                exec_id: "e".into()
            }),
            "/tasks/exec-added"
        );
        assert_eq!(
            t(Event::Start {
                id: "c".into(),
                pid: 1
            }),
            "/tasks/start"
        );
    }
}
