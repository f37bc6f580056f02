// The client side of a session, read on demand: nothing is read from the socket until the
// session asks for more, so at most one read's worth (a few chunks) is ever buffered, however
// fast the client writes and however slow the relay is. Writes complete when the socket took
// them. Event-loop confined state behind a Sendable front.

import NIOCore

/// Buffers what one socket read delivered and hands it out on request. Event-loop confined.
final class ClientHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private var chunks = CircularBuffer<ByteBuffer>()
    private var waiting: EventLoopPromise<ByteBuffer?>?
    private var ended = false
    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.end()
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let chunk = self.unwrapInboundIn(data)
        if let waiting = self.waiting {
            self.waiting = nil
            waiting.succeed(chunk)
        } else {
            self.chunks.append(chunk)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.end()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.end()
        context.close(promise: nil)
    }

    private func end() {
        self.ended = true
        self.waiting?.succeed(nil)
        self.waiting = nil
    }

    /// The next chunk, or nil at the end of the stream.
    func next(_ eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer?> {
        if let chunk = self.chunks.popFirst() { return eventLoop.makeSucceededFuture(chunk) }
        if self.ended { return eventLoop.makeSucceededFuture(nil) }
        precondition(self.waiting == nil, "two readers of one client connection")
        let promise = eventLoop.makePromise(of: ByteBuffer?.self)
        self.waiting = promise
        self.context?.read()
        return promise.futureResult
    }
}

final class ClientConnection: Sendable {
    let channel: any Channel
    private let handler: NIOLoopBound<ClientHandler>

    private init(channel: any Channel, handler: NIOLoopBound<ClientHandler>) {
        self.channel = channel
        self.handler = handler
    }

    /// Takes over an accepted channel (which does not read on its own: see `Listener`).
    static func adopt(_ channel: any Channel) async throws -> ClientConnection {
        let handler = try await channel.eventLoop.submit {
            let handler = ClientHandler()
            try channel.pipeline.syncOperations.addHandler(handler)
            return NIOLoopBound(handler, eventLoop: channel.eventLoop)
        }.get()
        return ClientConnection(channel: channel, handler: handler)
    }

    /// The next bytes from the client, or nil when it is gone.
    func read() async throws -> ByteBuffer? {
        let el = self.channel.eventLoop
        let handler = self.handler
        if el.inEventLoop { return try await handler.value.next(el).get() }
        return try await el.flatSubmit { handler.value.next(el) }.get()
    }

    func write(_ buffer: ByteBuffer) async throws {
        try await self.channel.writeAndFlush(buffer)
    }

    func close() {
        self.channel.close(promise: nil)
    }
}
