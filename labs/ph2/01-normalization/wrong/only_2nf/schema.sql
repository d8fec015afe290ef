-- WRONG (2NF, not 3NF): the customer's details stay on the order. Every column depends on
-- the whole key of its table, but customer_name/email/city depend on order_id only through
-- customer_id - a transitive dependency, repeated on every order of that customer.

CREATE TABLE products (
    product_sku  text PRIMARY KEY,
    product_name text NOT NULL
);

CREATE TABLE orders (
    order_id       integer PRIMARY KEY,
    order_date     date    NOT NULL,
    customer_id    integer NOT NULL,
    customer_email text    NOT NULL,
    customer_name  text    NOT NULL,
    customer_city  text    NOT NULL
);

CREATE TABLE order_lines (
    order_id    integer       NOT NULL REFERENCES orders (order_id),
    product_sku text          NOT NULL REFERENCES products (product_sku),
    quantity    integer       NOT NULL CHECK (quantity > 0),
    unit_price  numeric(10,2) NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (order_id, product_sku)
);

INSERT INTO products SELECT DISTINCT product_sku, product_name FROM orders_denormalized;
INSERT INTO orders
SELECT DISTINCT order_id, order_date, customer_id, customer_email, customer_name, customer_city
FROM orders_denormalized;
INSERT INTO order_lines
SELECT order_id, product_sku, quantity, unit_price FROM orders_denormalized;

CREATE VIEW orders_rebuilt AS
SELECT o.order_id, o.order_date, o.customer_id, o.customer_email, o.customer_name,
       o.customer_city, p.product_sku, p.product_name, l.quantity, l.unit_price
FROM order_lines l
JOIN orders   o ON o.order_id    = l.order_id
JOIN products p ON p.product_sku = l.product_sku;
