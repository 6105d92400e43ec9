//! The agent's ttrpc server (src/server.rs) on a Unix socket: connections
//! and threads are bounded, and every malformed request gets an answer.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{ctx, TestAgent};
use husk_protocols::agent as pb;
use husk_protocols::ttrpc::proto::{Codec, MESSAGE_TYPE_RESPONSE};
use husk_protocols::ttrpc::{Code, MessageHeader, Request, Response};

/// src/server.rs's MAX_CONNECTIONS.
const MAX_CONNECTIONS: usize = 4;

/// The agent's threads' names.
fn threads(pid: i32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// The agent's threads once there are `n` of them (up to 5 s).
fn settled(pid: i32, n: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let t = threads(pid);
        // Every thread but main named (a new thread names itself).
        let named = t.iter().filter(|x| *x == "husk-agent").count() == 1;
        if (t.len() == n && named) || start.elapsed() > Duration::from_secs(5) {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(a: &TestAgent) -> UnixStream {
    let s = UnixStream::connect(&a.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn send(s: &mut UnixStream, mh: MessageHeader, body: &[u8]) {
    let head: Vec<u8> = mh.into();
    s.write_all(&head).unwrap();
    s.write_all(body).unwrap();
}

/// Reads one answer: (stream id, status code, message).
fn answer(s: &mut UnixStream) -> (u32, Code, String) {
    let mut head = [0u8; 10];
    s.read_exact(&mut head).expect("an answer, not silence");
    let mh = MessageHeader::from(&head[..]);
    assert_eq!(mh.type_, MESSAGE_TYPE_RESPONSE);
    let mut body = vec![0u8; mh.length as usize];
    s.read_exact(&mut body).unwrap();
    let r = Response::decode(&body).unwrap();
    let st = r.status.unwrap_or_default();
    (mh.stream_id, st.code(), st.message)
}

fn len(body: &[u8]) -> u32 {
    u32::try_from(body.len()).unwrap()
}

fn request(method: &str, payload: &[u8]) -> Vec<u8> {
    let mut r = Request::new();
    r.service = "husk.agent.v1.AgentService".into();
    r.method = method.into();
    r.payload = payload.to_vec();
    r.encode().unwrap()
}

#[test]
fn malformed_requests_get_an_answer() {
    let Some(a) = TestAgent::start() else { return };
    let mut s = connect(&a);

    // Not a ttrpc Request at all.
    let junk = [0xffu8; 16];
    send(&mut s, MessageHeader::new_request(1, 16), &junk);
    let (id, code, msg) = answer(&mut s);
    assert_eq!((id, code), (1, Code::INVALID_ARGUMENT), "{msg}");

    // A Request for a real method whose payload is not its message.
    let body = request("CopyFile", &[0xff; 7]);
    send(&mut s, MessageHeader::new_request(3, len(&body)), &body);
    let (id, code, msg) = answer(&mut s);
    assert_eq!((id, code), (3, Code::INVALID_ARGUMENT), "{msg}");

    // No such method.
    let body = request("Nope", &[]);
    send(&mut s, MessageHeader::new_request(5, len(&body)), &body);
    let (id, code, msg) = answer(&mut s);
    assert_eq!((id, code), (5, Code::UNIMPLEMENTED), "{msg}");

    // The connection still serves a good request after all that.
    let body = request("Check", &[]);
    send(&mut s, MessageHeader::new_request(7, len(&body)), &body);
    let (id, code, msg) = answer(&mut s);
    assert_eq!((id, code), (7, Code::OK), "{msg}");

    // Over 4 MiB: an answer, then the connection closes.
    send(&mut s, MessageHeader::new_request(9, 5 << 20), &[]);
    let (id, code, msg) = answer(&mut s);
    assert_eq!((id, code), (9, Code::RESOURCE_EXHAUSTED), "{msg}");
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "closed after an oversize frame");

    // The agent's own client still works.
    a.client.check(ctx(), &pb::CheckRequest::new()).unwrap();
}

#[test]
fn connections_and_threads_are_bounded() {
    let Some(a) = TestAgent::start() else { return };
    let pid = a.pid();
    a.client.check(ctx(), &pb::CheckRequest::new()).unwrap();
    // main, accept, reaper, oom and the harness's connection.
    let before = settled(pid, 5);
    // The harness's client holds one connection already.
    let mut conns: Vec<UnixStream> = (0..300).map(|_| connect(&a)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let during = threads(pid);
    let served = during.iter().filter(|n| *n == "ttrpc-conn").count();
    assert_eq!(served, MAX_CONNECTIONS, "{during:?}");
    // One thread per served connection (and none for a refused one).
    assert!(
        during.len() <= before.len() + MAX_CONNECTIONS,
        "{during:?} with 300 connections, {before:?} before"
    );
    // The first MAX_CONNECTIONS - 1 are served; every other is closed.
    let mut closed = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        if i < MAX_CONNECTIONS - 1 {
            let body = request("Check", &[]);
            send(c, MessageHeader::new_request(1, len(&body)), &body);
            assert_eq!(answer(c).1, Code::OK, "connection {i} is served");
        } else {
            let mut b = [0u8; 1];
            if matches!(c.read(&mut b), Ok(0) | Err(_)) {
                closed += 1;
            }
        }
    }
    assert_eq!(closed, 300 - (MAX_CONNECTIONS - 1));
    drop(conns);
    // Once they are gone, a new connection is served again.
    let start = Instant::now();
    loop {
        let mut c = connect(&a);
        let body = request("Check", &[]);
        let head: Vec<u8> = MessageHeader::new_request(1, len(&body)).into();
        let mut got = [0u8; 10];
        // A connection the agent still counts is closed: writes fail.
        if c.write_all(&head).is_ok()
            && c.write_all(&body).is_ok()
            && c.read_exact(&mut got).is_ok()
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "not served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.client.check(ctx(), &pb::CheckRequest::new()).unwrap();
    // Calls' and closed connections' threads end.
    let after = settled(pid, before.len());
    assert_eq!(after, before);
}
