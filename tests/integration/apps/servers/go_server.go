// A Go HTTP server for handoff's server matrix: standard library only (Go >= 1.19).
//
// It answers like tests/integration/apps/versioned_app.py: VERSION_FILE is read once at
// start, every response carries X-Handoff-Generation and X-Handoff-Version and a JSON body.
//
// The socket: `-fd N` on the command line (handoff's `{fd}` placeholder), else the
// systemd convention (LISTEN_FDS / LISTEN_PID: the first socket is fd 3), taken with
// net.FileListener(os.NewFile(fd, ...)).
//
// The drain on SIGTERM (DRAIN in the environment):
//
//	graceful (default)  stop accepting, keep idle keep-alive connections open and answer
//	                    the next request on each with `Connection: close`; after
//	                    DRAIN_GRACE_MS (or once no connection is left) http.Server.Shutdown
//	                    closes what is still idle and waits for the requests in flight.
//	plain               http.Server.Shutdown at once, as most Go servers do. It closes
//	                    every idle keep-alive connection immediately, which races with
//	                    requests clients are sending on them.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// tracker counts the server's open connections (http.Server does not say).
type tracker struct {
	mu    sync.Mutex
	open  map[net.Conn]struct{}
	empty chan struct{} // closed when draining and no connection is left
	drain bool
}

func (t *tracker) state(c net.Conn, s http.ConnState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch s {
	case http.StateNew:
		t.open[c] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(t.open, c)
	}
	t.check()
}

func (t *tracker) startDrain() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.drain = true
	t.check()
}

func (t *tracker) check() {
	if t.drain && len(t.open) == 0 {
		select {
		case <-t.empty:
		default:
			close(t.empty)
		}
	}
}

func listenFd(flagFd int) int {
	if flagFd >= 0 {
		return flagFd
	}
	n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) && n >= 1 {
		return 3
	}
	log.Fatal("no socket: pass -fd N or start me with LISTEN_FDS/LISTEN_PID (handoff run)")
	return -1
}

func main() {
	fdFlag := flag.Int("fd", -1, "listening socket's file descriptor")
	flag.Parse()
	raw, err := os.ReadFile(os.Getenv("VERSION_FILE"))
	if err != nil {
		log.Fatal(err)
	}
	version := strings.TrimSpace(string(raw))
	generation := os.Getenv("HANDOFF_GENERATION")
	if generation == "" {
		generation = "?"
	}
	drainMode := os.Getenv("DRAIN")
	grace := 10 * time.Second
	if ms, err := strconv.Atoi(os.Getenv("DRAIN_GRACE_MS")); err == nil {
		grace = time.Duration(ms) * time.Millisecond
	}
	body, _ := json.Marshal(map[string]any{
		"version": version, "generation": generation, "pid": os.Getpid(),
	})

	fd := listenFd(*fdFlag)
	// FileListener dups the fd; close the original so only one copy stays open.
	file := os.NewFile(uintptr(fd), fmt.Sprintf("listen-fd-%d", fd))
	ln, err := net.FileListener(file)
	if err != nil {
		log.Fatal(err)
	}
	file.Close()

	var draining atomic.Bool
	conns := &tracker{open: map[net.Conn]struct{}{}, empty: make(chan struct{})}
	server := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h := w.Header()
			h.Set("Content-Type", "application/json")
			h.Set("Content-Length", strconv.Itoa(len(body)))
			h.Set("X-Handoff-Generation", generation)
			h.Set("X-Handoff-Version", version)
			if draining.Load() {
				// net/http sends it and closes the connection after this response.
				h.Set("Connection", "close")
			}
			w.Write(body)
		}),
		ConnState: conns.state,
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		<-stop
		draining.Store(true)
		if drainMode != "plain" {
			// Stop accepting; Serve returns. Idle connections stay open.
			ln.Close()
			conns.startDrain()
			select {
			case <-conns.empty:
			case <-time.After(grace):
			}
		}
		// Closes the listener (if still open) and idle connections, waits for the rest.
		server.Shutdown(context.Background())
		close(done)
	}()

	if err := server.Serve(ln); err != nil && err != http.ErrServerClosed && !draining.Load() {
		log.Fatal(err)
	}
	<-done
}
